//! A WebSocket echo service: hyper answers the upgrade (101 with `Sec-WebSocket-Accept`), then
//! tokio-tungstenite speaks WebSocket on the upgraded connection and sends every text or
//! binary message back. `/health` answers plain HTTP for Consul's check; any other request
//! that is not an upgrade gets 426. Registers itself in Consul like `hello` and deregisters on
//! Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run --example websocket -- --port 0 --consul http://127.0.0.1:8500    # serve
//! cargo run --example websocket -- --call ws://127.0.0.1:8080/ws --count 100  # echo client
//! ```
//! Serving prints `listening on <addr> as <id>` once registered; `--call` prints
//! `<id>: echoed <n> of <n> messages` (the id from the 101's `x-instance` header) and exits 1
//! when an echo is missing or wrong.

#[path = "support/consul.rs"]
mod consul;

use std::convert::Infallible;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Parser)]
#[command(about = "A WebSocket echo service that registers itself in Consul")]
struct Args {
    #[command(flatten)]
    registration: consul::Registration,
    /// Consul service name.
    #[arg(long, default_value = "ws")]
    name: String,
    /// Client mode: open this ws:// URL, send --count messages and check their echoes.
    #[arg(long, value_name = "URL")]
    call: Option<String>,
    /// Client mode: how many messages.
    #[arg(long, default_value_t = 10)]
    count: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.call {
        return call(url, args.count).await;
    }
    args.registration.run(&args.name, serve).await
}

async fn serve(listener: TcpListener, id: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let id = id.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let id = id.clone();
                async move { Ok::<_, Infallible>(answer(&id, request)) }
            });
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(id: &str, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/health" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let wants_websocket = request
        .headers()
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = request.headers().get(SEC_WEBSOCKET_KEY).cloned();
    let (Some(key), true) = (key, wants_websocket) else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"a WebSocket echo\n")));
        *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
        response
            .headers_mut()
            .insert(UPGRADE, "websocket".parse().expect("a header value"));
        return response;
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            echo(socket).await;
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, "websocket".parse().expect("a header value"));
    headers.insert(CONNECTION, "upgrade".parse().expect("a header value"));
    let accept = derive_accept_key(key.as_bytes());
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept.parse().expect("base64"));
    if let Ok(value) = id.parse() {
        headers.insert("x-instance", value);
    }
    response
}

/// Sends every text and binary message back until the client closes (pings are answered by
/// tungstenite itself).
async fn echo<S>(mut socket: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// Client mode: `count` text messages, each echo checked, then a clean close.
async fn call(url: &str, count: u32) -> anyhow::Result<()> {
    let uri: Uri = url.parse().with_context(|| format!("--call {url}"))?;
    let authority = uri
        .authority()
        .context("--call needs ws://host:port/path")?;
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut socket, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    let instance = response
        .headers()
        .get("x-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let mut echoed = 0;
    for i in 0..count {
        let text = format!("message {i}");
        socket.send(Message::text(text.clone())).await?;
        match socket.next().await {
            Some(Ok(Message::Text(echo))) if echo.as_str() == text => echoed += 1,
            other => bail!("{instance}: message {i}: expected its echo, got {other:?}"),
        }
    }
    socket.close(None).await?;
    println!("{instance}: echoed {echoed} of {count} messages");
    Ok(())
}
