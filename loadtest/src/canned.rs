//! The trivial server: answers OpenAI chat and completions requests with one canned 16-token
//! completion (48 prompt tokens in `usage`), streamed as 16 content chunks or not, and lists one
//! model. It does no work per request beyond reading the body, so a load test against it measures
//! the load generator (and loopback HTTP) — the ceiling any real server is compared with. Binds
//! loopback only, on its own thread and runtime so that it can live beside the client in one
//! process as it would in another.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use memchr::memmem;
use serde_json::json;

/// Prompt tokens the canned `usage` reports.
pub const PROMPT_TOKENS: u64 = 48;
/// Output tokens of the canned completion (one per streamed content chunk).
pub const OUTPUT_TOKENS: u64 = 16;
/// The model id listed and echoed.
pub const MODEL: &str = "canned";

const WORDS: [&str; OUTPUT_TOKENS as usize] = [
    "Thanks",
    " for",
    " reaching",
    " out",
    "!",
    " Your",
    " order",
    " ships",
    " within",
    " two",
    " business",
    " days",
    " and",
    " tracking",
    " follows",
    ".",
];

/// Pre-rendered responses (built once per server).
struct Canned {
    chat_json: Bytes,
    chat_sse: Vec<Bytes>,
    text_json: Bytes,
    text_sse: Vec<Bytes>,
    models: Bytes,
}

impl Canned {
    fn new() -> Canned {
        let usage = json!({
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": OUTPUT_TOKENS,
            "total_tokens": PROMPT_TOKENS + OUTPUT_TOKENS,
        });
        let text: String = WORDS.concat();
        let sse = |v: serde_json::Value| Bytes::from(format!("data: {v}\n\n"));
        let chat_json = json!({
            "id": "chatcmpl-canned", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": usage,
        });
        let chunk = |choices: serde_json::Value| {
            json!({"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 0,
                   "model": MODEL, "choices": choices})
        };
        let mut chat_sse = vec![sse(chunk(json!([{"index": 0,
            "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])))];
        chat_sse.extend(WORDS.iter().map(|w| {
            sse(chunk(
                json!([{"index": 0, "delta": {"content": w}, "finish_reason": null}]),
            ))
        }));
        chat_sse.push(sse(chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": "length"}]),
        )));
        let mut last = chunk(json!([]));
        last["usage"] = usage.clone();
        chat_sse.push(sse(last));
        chat_sse.push(Bytes::from_static(b"data: [DONE]\n\n"));

        let text_json = json!({
            "id": "cmpl-canned", "object": "text_completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length"}],
            "usage": usage,
        });
        let tchunk = |choices: serde_json::Value| {
            json!({"id": "cmpl-canned", "object": "text_completion", "created": 0,
                   "model": MODEL, "choices": choices})
        };
        let mut text_sse: Vec<Bytes> = WORDS
            .iter()
            .map(|w| {
                sse(tchunk(
                    json!([{"index": 0, "text": w, "logprobs": null, "finish_reason": null}]),
                ))
            })
            .collect();
        text_sse.push(sse(tchunk(
            json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}]),
        )));
        let mut last = tchunk(json!([]));
        last["usage"] = usage;
        text_sse.push(sse(last));
        text_sse.push(Bytes::from_static(b"data: [DONE]\n\n"));

        let models = json!({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                         "created": 0, "owned_by": "loadtest"}]});
        Canned {
            chat_json: Bytes::from(chat_json.to_string()),
            chat_sse,
            text_json: Bytes::from(text_json.to_string()),
            text_sse,
            models: Bytes::from(models.to_string()),
        }
    }
}

type FrameStream = stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
type CannedBody = Either<Full<Bytes>, StreamBody<FrameStream>>;

fn full(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<CannedBody> {
    let mut r = Response::new(Either::Left(Full::new(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

async fn handle(
    canned: Arc<Canned>,
    req: Request<Incoming>,
) -> Result<Response<CannedBody>, Infallible> {
    let chat = match req.uri().path() {
        "/v1/chat/completions" => true,
        "/v1/completions" => false,
        "/v1/models" => {
            return Ok(full(
                StatusCode::OK,
                "application/json",
                canned.models.clone(),
            ))
        }
        _ => {
            let body = Bytes::from_static(
                br#"{"error":{"message":"not found","type":"not_found_error"}}"#,
            );
            return Ok(full(StatusCode::NOT_FOUND, "application/json", body));
        }
    };
    // The whole body is read, as a real server must, before answering.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let body = Bytes::from_static(
                br#"{"error":{"message":"bad body","type":"invalid_request_error"}}"#,
            );
            return Ok(full(StatusCode::BAD_REQUEST, "application/json", body));
        }
    };
    let streaming = memmem::find(&body, b"\"stream\":true").is_some()
        || memmem::find(&body, b"\"stream\": true").is_some();
    if !streaming {
        let json = if chat {
            &canned.chat_json
        } else {
            &canned.text_json
        };
        return Ok(full(StatusCode::OK, "application/json", json.clone()));
    }
    let chunks = if chat {
        &canned.chat_sse
    } else {
        &canned.text_sse
    };
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.iter().map(|c| Ok(Frame::data(c.clone()))).collect();
    let mut r = Response::new(Either::Right(StreamBody::new(stream::iter(frames))));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    Ok(r)
}

/// A running canned server; stops when dropped.
pub struct CannedServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CannedServer {
    /// Binds 127.0.0.1:`port` (0 = any free port) and serves on a new thread with a runtime of
    /// `threads` workers (1 = single-threaded).
    pub fn start(port: u16, threads: usize) -> std::io::Result<CannedServer> {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("canned-server".into())
            .spawn(move || runtime.block_on(serve(listener, stopped)))?;
        Ok(CannedServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for CannedServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: StdListener, mut stopped: tokio::sync::oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("canned server: {e}");
            return;
        }
    };
    let canned = Arc::new(Canned::new());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stopped => break,
        };
        // Reap finished connections so a long run does not accumulate handles.
        while conns.try_join_next().is_some() {}
        let Ok((tcp, _)) = accepted else {
            // Out of descriptors or a reset before accept: keep serving the others.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let canned = canned.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(canned.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
    // Dropping the set aborts open keep-alive connections: the server is going away.
    conns.abort_all();
}
