//! Bench-only: the fastest reasonable upstream, a minimal hyper HTTP/1.1 server answering
//! `200 ok` to everything, on two worker threads like every proxy in the comparison.
//! `/discard` reads the request body to its end, throws it away and answers with the number
//! of bytes it read (the load harness's streamed-upload run).
//! Usage: `bench_upstream 127.0.0.1:PORT`.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/discard" {
                        return Ok::<_, Infallible>(discard(req.into_body()).await);
                    }
                    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Reads `body` frame by frame without keeping any of it; answers with the byte count.
async fn discard(mut body: Incoming) -> Response<Full<Bytes>> {
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                }
            }
            Err(_) => {
                let mut response = Response::new(Full::new(Bytes::from(read.to_string())));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            }
        }
    }
    Response::new(Full::new(Bytes::from(read.to_string())))
}
