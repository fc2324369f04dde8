//! Background tasks that run after the response, for any tower-based HTTP
//! server: FastAPI's `BackgroundTasks`, for axum, hyper and tonic.
//!
//! A handler queues work (send the welcome email, refresh a cache, write
//! analytics), returns its response at once, and the work runs afterwards on
//! the tokio runtime, once the response body has been sent.
//! [`BackgroundLayer`] puts a per-request [`BackgroundTasks`] queue into every
//! request's extensions and wraps the response body in a
//! [`BackgroundBody`] that starts the queued tasks when it ends.
//!
//! Compared with `tokio::spawn` in the handler, tasks wait for the response
//! to be delivered, keep their order, are counted and logged with the
//! request's method and path, survive a client that disconnects, are
//! discarded when the request fails before it has a response, and are
//! drained by a graceful [`shutdown`](BackgroundHandle::shutdown).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_background::{BackgroundLayer, BackgroundTasks};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = BackgroundLayer::new();
//! let handle = layer.handle();
//! let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
//! let sent_tx = std::sync::Mutex::new(Some(sent_tx));
//!
//! let svc = ServiceBuilder::new().layer(layer).service_fn(move |req: Request<Full<bytes::Bytes>>| {
//!     let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
//!     let sent_tx = sent_tx.lock().unwrap().take();
//!     async move {
//!         tasks.add(async move {
//!             // send the welcome email...
//!             let _ = sent_tx.unwrap().send("email sent");
//!         });
//!         Ok::<_, Infallible>(Response::new(Full::<bytes::Bytes>::from("registered")))
//!     }
//! });
//!
//! let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
//! let body = res.into_body().collect().await.unwrap().to_bytes(); // the task starts here
//! assert_eq!(body, "registered");
//! assert_eq!(sent_rx.await.unwrap(), "email sent");
//! handle.wait_idle().await;
//! assert_eq!(handle.stats().completed, 1);
//! # }
//! ```
//!
//! # When tasks run
//!
//! Tasks queued during a request start once its response body has ended
//! and the server has let go of it. The body ends when `poll_frame` returns
//! `None`, an error or a trailers frame (always the last), or when the body
//! reports [`is_end_stream`](http_body::Body::is_end_stream) after a frame
//! (servers stop polling a finished body), or when the server drops it once
//! it has yielded exactly its `Content-Length`. The server lets go of it
//! when it drops it (every hyper-based server does right after writing the
//! last frame) or polls it again. So tasks start when the server has taken
//! the last frame, not when the client has received it, and never inside
//! the poll that ends the body, where they could get in the way of the
//! server's write of its end. Never before the end either: a
//! streaming body's tasks wait for its last chunk.
//!
//! A body dropped without ever being polled counts as delivered, with
//! [`Outcome::NoBody`], only when it had nothing to send: a `HEAD` request,
//! a 1xx, 204 or 304 status, or a body whose size is exactly 0. Any other
//! body dropped unpolled was [`Outcome::Aborted`] (an HTTP/2 client that
//! reset its stream right after the headers, a timeout outside the layer).
//!
//! Tasks run on spawned tokio tasks, so they never delay the response, nor
//! the next request on a keep-alive connection;
//! [`add_blocking`](BackgroundTasks::add_blocking) runs a synchronous closure
//! on tokio's blocking pool. A request's runner starts at most 16 ready tasks
//! in a row before it yields to the scheduler, so no request holds a worker.
//!
//! Tasks run on the tokio runtime current where the body is let go of, or
//! where a late task is added. Where that happens off any runtime (a body
//! dropped on a plain thread), they run on the runtime that served that
//! service's first request.
//!
//! # Ordering
//!
//! With [`Execution::Sequential`] (the default, FastAPI's behaviour) a
//! request's tasks run one after another in the order they were added.
//! With [`Execution::Concurrent`] they all start together. Tasks of
//! different requests are independent, and
//! [`max_concurrent_tasks`](BackgroundLayer::max_concurrent_tasks) caps how
//! many of the layer's tasks run at once (the others wait in FIFO order).
//!
//! A task added after its request's tasks were started (from a clone of the
//! queue moved into a spawned future) still runs: behind the running
//! sequence, or on its own if the sequence has ended.
//!
//! # Which responses run their tasks
//!
//! | what happened | `add`, `add_blocking` (default policy) | `add_with` |
//! |---|---|---|
//! | a 1xx, 2xx or 3xx response whose body finished, or had nothing to send | run | run, see `Finished` / `NoBody` |
//! | the same, but the body was aborted (client gone, stream reset) or yielded an error | run (discarded with [`run_on_abort(false)`](BackgroundLayer::run_on_abort)) | run, see `Aborted` / `BodyError` |
//! | a 4xx or 5xx response (rejected, failed, a `TimeoutLayer` 408, a `CatchPanicLayer` 500) | skipped | run, see [`Completion::status`] |
//! | the inner service returned `Err`, or the response future was dropped | discarded | discarded |
//!
//! Work the handler committed to is not lost because a client went away.
//! By default a task runs only after a success, as in FastAPI and Laravel:
//! [`RunPolicy`] says so per layer ([`BackgroundLayer::run_policy`]) or per
//! task ([`TaskOptions::run_policy`]): [`RunPolicy::Always`] runs after any
//! response, [`RunPolicy::OnDelivery`] only when the body went out whole.
//! Skipped tasks are counted in [`Stats::skipped`] and logged at debug
//! level. After-effects of a request that never produced a response do not
//! fire; each such request logs one warn-level event saying how many tasks
//! it discarded and why.
//!
//! # Production controls
//!
//! | setting | what it bounds |
//! |---|---|
//! | [`max_concurrent_tasks`](BackgroundLayer::max_concurrent_tasks) | tasks running at once; the others wait in FIFO order |
//! | [`max_pending_tasks`](BackgroundLayer::max_pending_tasks) | tasks added and not started: `poll_ready` reports not ready at the bound (tower backpressure; a 503 with `LoadShedLayer`) |
//! | [`max_tasks_per_request`](BackgroundLayer::max_tasks_per_request) | tasks one request may add; the rest are refused and counted |
//! | [`task_timeout`](BackgroundLayer::task_timeout) | how long one task may run |
//! | [`request_time_budget`](BackgroundLayer::request_time_budget) | how long one request's tasks may take in all |
//!
//! Tasks can be [named](TaskOptions::name): the name is a field of their
//! span, a named task replaces the request's waiting task of the same name,
//! and [`BackgroundTasks::forget`] takes one back. A
//! [coalescing key](TaskOptions::coalesce) keeps at most one pending task per
//! key across the whole layer.
//! [`on_task_end`](BackgroundLayer::on_task_end) sees every task's end
//! (name, outcome, error, queue and run times, method and path), and the
//! `metrics` feature records counters, gauges and histograms.
//!
//! # Failures
//!
//! A task that returns `Err` or panics is logged at error level (with the
//! error's `Display` text or the panic message) and counted; the tasks after
//! it still run, and the server is unaffected. With
//! [`task_timeout`](BackgroundLayer::task_timeout), a task that outlives its
//! deadline is dropped, logged at warn level and counted, and the next task
//! runs.
//!
//! # Tracing
//!
//! Each task runs inside an INFO span named `background_task` with the
//! request's `method` and `path`. It is a root span that *follows from* the
//! span that was current when the task was added, so its logs correlate
//! with the request without keeping the request's span open. The span is
//! created when the task is added, so its duration includes the wait for
//! the response.
//!
//! # Counting and graceful shutdown
//!
//! [`BackgroundLayer::handle`] returns a [`BackgroundHandle`]. Its
//! [`stats`](BackgroundHandle::stats) count every task, which ends in exactly
//! one of completed, failed, panicked, timed out, discarded, cancelled,
//! skipped (its run policy), refused (over
//! [`max_tasks_per_request`](BackgroundLayer::max_tasks_per_request)) or
//! replaced (by a task of the same name, taken back, or merged);
//! [`wait_idle`](BackgroundHandle::wait_idle) waits until nothing is pending
//! or running (use it in tests instead of sleeps), and
//! [`shutdown`](BackgroundHandle::shutdown) drains the tasks for a grace
//! period after the server's own graceful shutdown, then cancels the rest.
//!
//! # Cost
//!
//! A request that adds no task costs one allocation (its queue), one atomic
//! operation when its body ends, and one reference count of the service's
//! shared state: no lock, no spawn. Each task costs one allocation and a few
//! atomic counter updates (there is no layer-wide lock), and each request
//! that has tasks one spawned future that runs them (one per task with
//! [`Execution::Concurrent`]). A task that awaits registers once per runner
//! (once per request with [`Execution::Sequential`]) for the shutdown wakeup. [`task_timeout`](BackgroundLayer::task_timeout)
//! adds one timer allocation per request with tasks, and INFO tracing one
//! allocation per request for its method and path. A request waiting for a
//! permit of [`max_concurrent_tasks`](BackgroundLayer::max_concurrent_tasks)
//! is a pointer in the layer's queue, not a parked task.
//! [`BackgroundBody`] adds no allocation per frame.
//!
//! # Feature flags
//!
//! | feature | default | what |
//! |---|---|---|
//! | `axum` | off | [`BackgroundTasks`] is an axum extractor, and axum's `MatchedPath` is a task's [`route`](TaskEnd::route) (depends on `axum-core` and on `axum` without its default features) |
//! | `serde` | off | `Serialize` for [`Stats`] and [`ShutdownReport`], so a `/stats` route is one line |
//! | `metrics` | off | through the [`metrics`](https://docs.rs/metrics) facade: the counter `background_tasks_ended_total` (label `outcome`, the [`Stats`] field), the gauges `background_tasks_pending` and `background_tasks_running`, the histograms `background_task_queued_seconds` (added to started) and `background_task_run_seconds`. The counter and the histograms also have the label `task` where the task has a name, and `route` where the request matched an axum route (with the `axum` feature, the layer added with `Router::layer`): the template, never the raw path, which is unbounded. With both features, a request that matched a route keeps a copy of its method, URI and route from its arrival (one allocation), as an `on_task_end` hook makes it do |

#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub, rust_2018_idioms)]

// Dependencies run one way, each module using only those below it:
//   extract → tasks
//   layer → service → body, tasks → request (a request's tasks, from added
//     to ended: phase word, drain token, dispatch, the runner)
//   handle → registry
//   request → observe → job → config → ending → registry → sync;
//   request → limit → sync; config → limit; completion is used by all;
//   service, registry → backlog (max_pending_tasks) → sync.
mod backlog;
mod body;
mod completion;
mod config;
mod ending;
#[cfg(feature = "axum")]
mod extract;
mod handle;
mod job;
mod layer;
mod limit;
mod observe;
mod registry;
mod request;
mod service;
mod sync;
mod tasks;

pub use body::BackgroundBody;
pub use completion::{Completion, Outcome};
pub use config::{Execution, RunPolicy};
pub use ending::{TaskEnd, TaskOutcome};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use extract::MissingBackgroundLayer;
pub use handle::{BackgroundHandle, ShutdownReport};
pub use job::TaskOutput;
pub use layer::BackgroundLayer;
pub use registry::Stats;
pub use service::{BackgroundService, ResponseFuture};
pub use tasks::{BackgroundTasks, TaskOptions};

// The README's snippets are compiled and run as doctests.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
