//! The OpenAI-compatible HTTP/SSE daemon: routes, wire types, SSE framing, error bodies, auth,
//! admission (503) and graceful drain.
//!
//! Knows requests, text and JSON; knows nothing of tensors or blocks — it talks to the engine
//! only through [`crate::engine::EngineHandle`] and reads its events.

mod admission;
mod body;
mod connection;
mod constrain;
mod error;
mod fields;
mod json;
mod metrics;
mod output;
mod preprocess;
mod protocol;
mod request_log;
mod routes;
mod scores;
mod sse;
mod state;
mod tool_calls;
mod validate;

pub use error::ApiError;
pub use metrics::step_observer;
pub use state::{ModelBehaviour, WorkerInfo};
pub use validate::SamplingDefaults;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;
use admission::Admission;
use body::BodyLimits;
pub use connection::ConnectionLimits;
use preprocess::PreprocessPool;
use state::AppState;

/// Everything the HTTP layer needs to know, resolved from the configuration.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    pub served_model_name: String,
    pub api_keys: Vec<String>,
    pub max_waiting_requests: usize,
    pub max_queued_prompt_tokens: usize,
    pub tokenizer_workers: usize,
    pub max_body_bytes: usize,
    /// From the end of a request's headers to the last byte of its body.
    pub body_read_timeout: Duration,
    /// Header deadline, keep-alive idle time and the bound on open connections.
    pub connections: ConnectionLimits,
    pub shutdown_grace: Duration,
    /// Origins allowed by CORS; empty disables CORS, `*` allows any.
    pub cors_allow_origins: Vec<String>,
    /// One log line per finished or refused request.
    pub log_requests: bool,
    /// The model's reasoning parser and sampling defaults.
    pub behaviour: ModelBehaviour,
}

/// Serves until SIGTERM/SIGINT, then drains: `/ready` turns 503 at once, no new connection is
/// accepted, connections with no request in flight are closed, in-flight requests get up to
/// `shutdown_grace` to finish. `metrics` is the set the engine's step observer already records
/// into (see [`step_observer`]).
pub async fn serve(
    opts: ServerOptions,
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(opts.host.as_str(), opts.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("cannot resolve --host {}", opts.host))?;
    let listener = bind(addr)?;
    let local = listener.local_addr()?;
    let state = Arc::new(AppState::new(
        engine,
        tokenizer,
        opts.served_model_name.clone(),
        Admission::new(opts.max_waiting_requests, opts.max_queued_prompt_tokens),
        PreprocessPool::new(opts.tokenizer_workers, opts.max_waiting_requests.max(64))?,
        opts.api_keys.clone(),
        metrics,
        request_log::RequestLog {
            enabled: opts.log_requests,
        },
        opts.behaviour.clone(),
    ));
    let app = router(state.clone(), &opts);
    tracing::info!(address = %local, model = %opts.served_model_name, "listening");
    // Tests and supervisors read this line to learn the port when --port 0 was asked.
    println!("distillery listening on http://{local}");

    let limits = ConnectionLimits {
        max_connections: connection::fit_to_descriptors(opts.connections.max_connections),
        ..opts.connections
    };
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(connection::serve(
        listener,
        app,
        limits,
        state.connections.clone(),
        drain_rx,
    ));
    wait_for_signal().await;
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!(
        "shutdown signal: draining; connections with no request in flight are closed now"
    );
    let _ = drain_tx.send(true);
    match tokio::time::timeout(opts.shutdown_grace, server).await {
        Ok(Ok(())) => tracing::info!("drained; exiting"),
        Ok(Err(e)) => return Err(anyhow::anyhow!("server task failed: {e}")),
        Err(_) => tracing::warn!(
            grace_s = opts.shutdown_grace.as_secs_f64(),
            "grace period over with requests still in flight; exiting"
        ),
    }
    Ok(())
}

/// A listener with a backlog sized for thousands of connections arriving at once.
fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>, opts: &ServerOptions) -> Router {
    let v1 = Router::new()
        .route("/completions", post(routes::completions::completions))
        .route("/chat/completions", post(routes::chat::chat_completions))
        .route(
            "/completions/render",
            post(routes::worker::render_completions),
        )
        .route(
            "/chat/completions/render",
            post(routes::worker::render_chat),
        )
        .route("/models", get(routes::info::models))
        .route("/models/{*id}", get(routes::info::model))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let tokenize = Router::new()
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route("/tokenizer_info", get(routes::info::tokenizer_info))
        .route("/flush_cache", post(routes::worker::flush_cache))
        .route("/reset_prefix_cache", post(routes::worker::flush_cache))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut app = Router::new()
        .nest("/v1", v1)
        .merge(tokenize)
        .route("/health", get(routes::info::health))
        .route("/health_generate", get(routes::worker::health_generate))
        .route("/server_info", get(routes::worker::server_info))
        .route("/get_server_info", get(routes::worker::server_info))
        .route("/model_info", get(routes::worker::model_info))
        .route("/get_model_info", get(routes::worker::model_info))
        .route("/get_load", get(routes::worker::get_load))
        .route("/load", get(routes::worker::load))
        .route("/kv_event_sources", get(routes::worker::kv_event_sources))
        .route("/ready", get(routes::info::ready))
        .route("/version", get(routes::info::version))
        .route("/openapi.json", get(routes::info::openapi))
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::new(BodyLimits {
                max_bytes: opts.max_body_bytes,
                deadline: opts.body_read_timeout,
            }),
            body::receive,
        ))
        .layer(middleware::from_fn(request_id))
        // Outermost, so it sees each response as it leaves, whichever layer produced it.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::count_rejections,
        ))
        .with_state(state);
    if !opts.cors_allow_origins.is_empty() {
        let origins = if opts.cors_allow_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                opts.cors_allow_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods(tower_http::cors::Any)
                .allow_headers(tower_http::cors::Any),
        );
    }
    app
}

async fn not_found(req: Request) -> Response {
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if grpc {
        // A gRPC probe (the SGLang gateway asks each worker whether it speaks gRPC): gRPC's
        // own answer for a service we do not have, UNIMPLEMENTED, trailers-only.
        tracing::debug!(path = req.uri().path(), "gRPC call answered UNIMPLEMENTED");
        return (
            StatusCode::OK,
            [
                (axum::http::header::CONTENT_TYPE, "application/grpc"),
                (HeaderName::from_static("grpc-status"), "12"),
                (
                    HeaderName::from_static("grpc-message"),
                    "this server speaks HTTP, not gRPC",
                ),
            ],
        )
            .into_response();
    }
    // Logged: a router or balancer in front calling an endpoint we lack shows up here.
    tracing::info!(method = %req.method(), path = req.uri().path(), "no such endpoint (404)");
    ApiError::not_found(req.uri().path()).into_response()
}

/// `Authorization: Bearer KEY`, compared in constant time against every configured key.
async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if st.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme name is case-insensitive (RFC 7235).
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key.trim())
        })
        .unwrap_or("");
    let ok = st.api_keys.iter().fold(false, |acc, k| {
        acc | bool::from(k.as_bytes().ct_eq(given.as_bytes()))
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Echoes `x-request-id` (or makes one) so logs on both sides can be joined.
async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let span = tracing::info_span!("http", request_id = %id);
    let mut req = req;
    req.extensions_mut()
        .insert(request_log::RequestId(Arc::from(id.as_str())));
    let mut res = {
        let _guard = span.enter();
        tracing::debug!(method = %req.method(), path = %req.uri().path(), "request");
        drop(_guard);
        next.run(req).await
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    if res.status() == StatusCode::METHOD_NOT_ALLOWED {
        let mut e = ApiError::invalid("method not allowed", None);
        e.status = StatusCode::METHOD_NOT_ALLOWED;
        return e.into_response();
    }
    res
}
