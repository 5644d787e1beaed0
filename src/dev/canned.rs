//! A server with one canned HTTP answer, for unit tests that need an answer
//! no fake service gives (an empty id in a 200, a refusal with a status the
//! fakes never send). Every request gets the same status and body; the
//! requests are counted so a test can show how often a client asked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The running server: its base URL and the number of requests answered.
pub struct Canned {
    pub url: String,
    requests: Arc<AtomicUsize>,
}

impl Canned {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Starts a server answering every request with `status` and the JSON
/// `body` (and `Retry-After: 0`, so a retrying client does not wait). It
/// reads each request whole before answering: a client still sending its
/// body when the connection closes would see a reset, not the answer.
pub async fn answering(status: u16, body: &'static str) -> Canned {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a local port");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                if read_request(&mut conn).await.is_none() {
                    return;
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let answer = format!(
                    "HTTP/1.1 {status} Canned\r\ncontent-type: application/json\r\nretry-after: 0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Canned { url, requests }
}

/// Reads one request (headers, then `content-length` bytes of body), at
/// most 64 KiB; `None` when the client went away first.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<()> {
    const MAX: usize = 64 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length.min(MAX) {
                return Some(());
            }
        }
        if buf.len() > MAX {
            return Some(());
        }
    }
}
