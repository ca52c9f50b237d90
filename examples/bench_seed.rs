//! Bench-only: fills a keygate database with service-account keys through keygate's own
//! issuing code and writes the plaintext keys, one per line, to a file for the load
//! generators and nginx's key map. Hashing uses cheap argon2 parameters: they only change the
//! cost of a cold verification, never the warm path the load test measures.
//! Usage: `bench_seed DATABASE_URL COUNT KEYS_FILE [SCOPE]`.

use std::io::Write;

use keygate::clock::Clock;
use keygate::config::{DatabaseUrl, HashingConfig};
use keygate::manage::{Actor, Manager};
use keygate::store::Store;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_seed DATABASE_URL COUNT KEYS_FILE [SCOPE]";
    let url = DatabaseUrl::new(args.next().ok_or(usage)?)?;
    let count: usize = args.next().ok_or(usage)?.parse()?;
    let out = args.next().ok_or(usage)?;
    let scope = args.next().unwrap_or_else(|| "bench".into());

    let store = Store::connect(&url, 4).await?;
    store.migrate().await?;
    let cheap = HashingConfig {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    let manager = Manager::new(store, cheap, Clock::System)?;
    let actor = Actor::cli();
    let account = match manager.account_named("bench").await {
        Ok(a) => a,
        Err(_) => manager.create_account("bench", "load test", &actor).await?,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out)?);
    for i in 0..count {
        let issued = manager
            .issue_key(
                &account,
                &format!("bench-{i}"),
                std::slice::from_ref(&scope),
                None,
                &actor,
            )
            .await?;
        writeln!(file, "{}", issued.key.expose())?;
    }
    file.flush()?;
    eprintln!("seeded {count} keys into {url}");
    Ok(())
}
