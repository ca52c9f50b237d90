//! Bench-only: the floor of keygate's stack. A minimal reverse proxy made of the same parts
//! keygate's data plane uses (hyper 1.x HTTP/1.1 server and client, one current-thread tokio
//! runtime per worker, connections handed out round-robin, one upstream connection per client
//! connection driven in the same task) and nothing else: no routing, no authentication, no
//! header rewriting, no metrics. What this costs per request is what any hyper proxy laid out
//! like keygate costs on this machine; the load harness measures keygate against it.
//!
//! ```text
//! cargo run --release --example bench_floor -- 127.0.0.1:8090 127.0.0.1:8081
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{Either, Empty};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Body = Either<Incoming, Empty<Bytes>>;

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(Either::Right(Empty::new()));
    *response.status_mut() = http::StatusCode::BAD_GATEWAY;
    response
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()?;
    let upstream: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()?;
    let workers = 2;
    let mut handoff = Vec::new();
    for _ in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        handoff.push(tx);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a worker runtime");
            rt.block_on(async move {
                while let Some(stream) = rx.recv().await {
                    if let Ok(stream) = TcpStream::from_std(stream) {
                        tokio::spawn(serve(stream, upstream));
                    }
                }
            });
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let mut next = 0usize;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let _ = handoff[next % workers].send(stream.into_std()?);
            next = next.wrapping_add(1);
        }
    })
}

/// One client connection and its own upstream connection, driven by one task.
async fn serve(client: TcpStream, upstream: SocketAddr) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, up_conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await
    else {
        return;
    };
    // Requests on an HTTP/1 connection come one at a time: the sender is taken and put back.
    let sender = Arc::new(Mutex::new(Some(sender)));
    let service = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = req.uri().path_and_query().cloned();
            *req.uri_mut() = http::Uri::from_parts(origin).unwrap_or_default();
            let taken = sender.lock().unwrap_or_else(PoisonError::into_inner).take();
            let Some(mut upstream) = taken else {
                return Ok::<_, Infallible>(bad_gateway());
            };
            match upstream.send_request(req).await {
                Ok(response) => {
                    *sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(upstream);
                    Ok(response.map(Either::Left))
                }
                Err(_) => Ok(bad_gateway()),
            }
        }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service);
    tokio::pin!(server);
    tokio::select! {
        biased;
        _ = &mut server => {}
        // The upstream closed its side (a client's `Connection: close` goes through unchanged):
        // the response it sent last may still be on its way to the client.
        _ = up_conn => {
            let _ = server.await;
        }
    }
}
