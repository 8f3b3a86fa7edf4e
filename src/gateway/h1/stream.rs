//! The byte streams the HTTP/1.1 client speaks over: plain TCP (`protocol: http1`) or TLS
//! (`protocol: https`), and the TLS settings of one kind of instance ([`TlsOrigin`]).
//!
//! One enum rather than a boxed trait object: the plain case, nearly all traffic, keeps
//! `TcpStream::split` (two borrows, no lock) for an exchange's concurrent write and read; a
//! TLS stream has one rustls state for both directions, so it goes through `tokio::io::split`
//! (a lock per operation, uncontended: both halves run in the request's task).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::http::uri::Authority;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::H1Error;

/// A connection's byte stream.
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls's state is ~1 KiB, and a connection moves through futures.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath (for its readiness while idle).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether bytes the instance sent are held above the socket, unread: TLS records
    /// already decrypted by rustls (never for plain TCP).
    pub fn has_unread(&mut self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls
                .get_mut()
                .1
                .process_new_packets()
                .map_or(true, |state| state.plaintext_bytes_to_read() > 0),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Distinguishes the pools of different TLS settings; 0 is plain TCP.
static NEXT_ORIGIN: AtomicU64 = AtomicU64::new(1);

/// How to reach one kind of TLS instance: the rustls config (roots, client certificate,
/// ALPN `http/1.1`) and the name to verify, when not the address dialled. Each one pools
/// its connections apart (built anew by a reload, so rotated files start fresh connections).
pub struct TlsOrigin {
    id: u64,
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl TlsOrigin {
    pub fn new(config: ClientConfig, server_name: Option<ServerName<'static>>) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_ORIGIN.fetch_add(1, Ordering::Relaxed),
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The pool this origin's connections go to.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs the TLS handshake on `tcp`, verifying the configured name or `key`'s host.
    pub async fn handshake(&self, tcp: TcpStream, key: &Authority) -> Result<Stream, H1Error> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = key.host().trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_owned()).map_err(|_| H1Error::ServerName)?
            }
        };
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(H1Error::Tls)?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}
