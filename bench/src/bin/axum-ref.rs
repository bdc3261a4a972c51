//! The ceiling for HTTP figures: the barest axum server, answering 204 to any method on any path
//! after reading the request body. `axum-ref --addr 127.0.0.1:18080`, then
//! `wrk -t2 -c32 -d5s http://127.0.0.1:18080/x`.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use clap::Parser;
use tokio::net::TcpListener;

/// A bare axum server answering 204 No Content to everything.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    addr: SocketAddr,
}

/// Takes the body so that a POST is read in full, as a real handler would, then drops it.
async fn no_content(_body: Bytes) -> StatusCode {
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    eprintln!("axum-ref listening on {}", listener.local_addr()?);
    axum::serve(listener, Router::new().fallback(no_content)).await?;
    Ok(())
}
