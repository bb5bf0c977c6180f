//! A client's byte stream: plain TCP, or TLS over TCP when the listener has a certificate.
//!
//! An enum rather than a generic connection: the session code stays one monomorphic copy, and the
//! plain path costs one well-predicted branch per read or write. The TLS state is boxed so that a
//! plain connection's stream is no bigger than the TCP stream itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::FusedFuture;
use futures::io::{AsyncRead, AsyncWrite};
use futures::{AsyncWriteExt as _, FutureExt as _};
use futures_rustls::server::TlsStream;
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;

use crate::executor::ExecCtx;
use crate::handshake;

pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
        }
    }
}

/// The stream for an accepted socket: the socket itself without TLS; with TLS, the session once
/// the server handshake is done, or `None` (counted, and a plain-HTTP client answered) when it
/// fails or `deadline` (the handshake timeout, shared with the HTTP upgrade) passes first.
pub async fn open(ctx: &ExecCtx, tcp: TcpStream, mut deadline: impl FusedFuture + Unpin) -> Option<ClientStream> {
    let Some(acceptor) = &ctx.tls else { return Some(ClientStream::Plain(tcp)) };
    // Boxed: the handshake's state (a rustls connection) then takes no room in the connection
    // task of a plain listener.
    let mut accept = Box::pin(accept_tls(acceptor, tcp)).fuse();
    let accepted = futures::select_biased! {
        r = accept => r,
        _ = deadline => Err(TlsRefused::Failed("tls_handshake_timeout")),
    };
    match accepted {
        Ok(s) => Some(s),
        Err(TlsRefused::PlainHttp(mut tcp)) => {
            ctx.metrics.handshake_failed("tls_plaintext_http");
            let answer = handshake::plain_response(
                400,
                "Bad Request",
                "this listener speaks TLS: connect with wss:// (or https://)\n",
            );
            if tcp.write_all(answer.as_bytes()).await.is_ok() {
                let _ = tcp.close().await;
            }
            None
        }
        Err(TlsRefused::Failed(cause)) => {
            ctx.metrics.handshake_failed(cause);
            None
        }
    }
}

/// Why a connection never got a TLS session.
enum TlsRefused {
    /// The client spoke plain HTTP to the TLS listener: it gets a plain-text 400 on this socket,
    /// which says what to do, instead of a TLS alert it cannot read.
    PlainHttp(TcpStream),
    /// The handshake failed (the cause is a metrics label); the socket is gone.
    Failed(&'static str),
}

/// The server side of the TLS handshake on an accepted socket (unbounded in time: the caller
/// bounds it with the handshake timeout).
async fn accept_tls(acceptor: &TlsAcceptor, tcp: TcpStream) -> Result<ClientStream, TlsRefused> {
    // Peek at the first byte: a TLS client starts with a handshake record (0x16), an HTTP client
    // with the letters of a method. Anything else is left to rustls to refuse.
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err(TlsRefused::Failed("closed_before_upgrade")),
        Err(_) => return Err(TlsRefused::Failed("io_error")),
        Ok(_) if first[0].is_ascii_alphabetic() => {
            return Err(TlsRefused::PlainHttp(tcp));
        }
        Ok(_) => {}
    }
    match acceptor.accept(tcp).await {
        Ok(tls) => Ok(ClientStream::Tls(Box::new(tls))),
        Err(e) => {
            // Scanners and clients that distrust the certificate end up here: not worth more
            // than a debug line each; the metric counts them.
            tracing::debug!(error = %e, "TLS handshake failed");
            Err(TlsRefused::Failed("tls_handshake"))
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// For TLS: sends close_notify, then closes the socket.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_close(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
