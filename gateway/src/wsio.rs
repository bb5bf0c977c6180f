//! A WebSocket connection's I/O without buffers of its own while idle.
//!
//! Reads go into one scratch buffer per executor thread, borrowed only for the duration of a
//! poll: glommio's unbuffered stream waits for readiness without a buffer, and the bytes are
//! decoded (wscodec) before the poll returns, so an idle connection holds no read buffer.
//! Complete messages wait in a queue that is released once empty. Writes are encoded into a
//! per-connection buffer that exists only until it is flushed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use wscodec::{Decoder, Inbound, Limits, Violation};

/// Bytes read per poll: one such buffer per executor thread, shared by its connections.
const SCRATCH_LEN: usize = 64 * 1024;

/// Encoded frames beyond this are written out before more are queued.
const FLUSH_AT: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// A message from the client.
#[derive(Debug)]
pub enum Message {
    Text(String),
    Binary,
    /// A Ping; its Pong is already queued (sent with the next flush).
    Ping,
    Pong,
    /// The client's Close; the reply is already queued.
    Close,
}

#[derive(Debug)]
pub enum ReadError {
    /// The client broke the protocol or a limit: close with this code.
    Violation(Violation),
    Io(std::io::Error),
}

pub struct WsIo<S> {
    stream: S,
    decoder: Decoder,
    /// Decoded messages not yet taken (unallocated when empty).
    inbound: VecDeque<Message>,
    /// A violation found while decoding bytes whose earlier messages are still queued.
    violation: Option<Violation>,
    /// Encoded frames not yet written (unallocated when empty).
    out: Vec<u8>,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// `leftover`: bytes the client sent after its upgrade request, read with it.
    pub fn new(stream: S, limits: Limits, mut leftover: Vec<u8>) -> Self {
        let mut io = WsIo {
            stream,
            decoder: Decoder::new(limits),
            inbound: VecDeque::new(),
            violation: None,
            out: Vec::new(),
            close_sent: false,
        };
        if !leftover.is_empty() {
            io.decode(&mut leftover);
        }
        io
    }

    /// The next message, `None` when the client closed the connection (EOF or after its Close).
    /// A poll rather than an `async fn`, so that the session's idle wait holds no future of its
    /// own (only glommio's readiness poll, in the stream). Bytes read are decoded in the same
    /// poll, so nothing is lost between polls.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, ReadError>>> {
        loop {
            if let Some(m) = self.inbound.pop_front() {
                if self.inbound.is_empty() {
                    self.inbound = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(m)));
            }
            if let Some(v) = self.violation.take() {
                return Poll::Ready(Some(Err(ReadError::Violation(v))));
            }
            if self.decoder.closed() {
                return Poll::Ready(None);
            }
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                match Pin::new(&mut self.stream).poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(n)) => {
                        if n > 0 {
                            self.decode(&mut scratch[..n]);
                        }
                        Poll::Ready(Ok(n))
                    }
                    other => other,
                }
            });
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(ReadError::Io(e)))),
            }
        }
    }

    /// Decodes `bytes`: messages go to `inbound`; the Pong for a Ping and the reply to a Close
    /// go to the write queue (sent with the session's next flush).
    fn decode(&mut self, bytes: &mut [u8]) {
        let (inbound, out, close_sent) = (&mut self.inbound, &mut self.out, &mut self.close_sent);
        let res = self.decoder.feed(bytes, &mut |m| {
            inbound.push_back(match m {
                Inbound::Text(t) => Message::Text(t.to_owned()),
                Inbound::Binary(_) => Message::Binary,
                Inbound::Ping(payload) => {
                    wscodec::encode_pong(payload, out);
                    Message::Ping
                }
                Inbound::Pong(_) => Message::Pong,
                Inbound::Close(status) => {
                    // RFC 6455 §5.5.1: answer a Close with a Close, echoing its status code.
                    if !*close_sent {
                        *close_sent = true;
                        wscodec::encode_close_reply(status.map(|(code, _)| code), out);
                    }
                    Message::Close
                }
            })
        });
        if let Err(v) = res {
            self.violation = Some(v);
        }
    }

    /// Queues a text frame; writes out what is queued once it is large.
    pub async fn feed_text(&mut self, text: &[u8]) -> std::io::Result<()> {
        wscodec::encode_text(text, &mut self.out);
        if self.out.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything queued, then releases the buffer.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let res = self.stream.write_all(&self.out).await;
        self.out = Vec::new();
        res
    }

    pub async fn send_text(&mut self, text: &[u8]) -> std::io::Result<()> {
        wscodec::encode_text(text, &mut self.out);
        self.flush().await
    }

    /// Sends a Close (once) with everything queued before it, then shuts the write side.
    pub async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        if !self.close_sent {
            self.close_sent = true;
            wscodec::encode_close(code, reason, &mut self.out);
        }
        self.flush().await?;
        self.stream.close().await
    }

    /// Heap bytes this connection's WebSocket layer holds right now.
    #[allow(dead_code)]
    pub fn buffered(&self) -> usize {
        self.decoder.buffered() + self.out.capacity() + self.inbound.capacity() * std::mem::size_of::<Message>()
    }
}
