//! A hand-written `demo.Greeter` gRPC service: the prost messages, the
//! server and the client that `tonic-build` would generate from
//!
//! ```text
//! syntax = "proto3";
//! package demo;
//! service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```
//!
//! written by hand so that building needs no `protoc`. Shared by
//! `src/main.rs` and the tests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use tonic::client::Grpc;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{GrpcMethod, IntoRequest, Request, Response, Status};
use tonic_prost::ProstCodec;

/// The request message of `SayHello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// The reply message of `SayHello`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The gRPC service name.
pub const SERVICE: &str = "demo.Greeter";
/// The HTTP/2 path of the `SayHello` method.
pub const SAY_HELLO: &str = "/demo.Greeter/SayHello";

/// What a `demo.Greeter` implementation provides (the trait `tonic-build`
/// generates). Closures `Fn(Request<HelloRequest>) -> impl Future` implement
/// it too.
pub trait Greeter: Send + Sync + 'static {
    /// Handles one `SayHello` call.
    fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> impl Future<Output = Result<Response<HelloReply>, Status>> + Send;
}

impl<F, Fut> Greeter for F
where
    F: Fn(Request<HelloRequest>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<HelloReply>, Status>> + Send,
{
    fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> impl Future<Output = Result<Response<HelloReply>, Status>> + Send {
        self(request)
    }
}

/// The server side: a `tower::Service` that routes the method path to the
/// [`Greeter`], for `tonic::transport::Server::add_service`.
#[derive(Debug)]
pub struct GreeterServer<T> {
    inner: Arc<T>,
}

impl<T> GreeterServer<T> {
    /// Serves `greeter`.
    pub fn new(greeter: T) -> Self {
        Self {
            inner: Arc::new(greeter),
        }
    }
}

impl<T> Clone for GreeterServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> NamedService for GreeterServer<T> {
    const NAME: &'static str = SERVICE;
}

impl<T, B> tower::Service<http::Request<B>> for GreeterServer<T>
where
    T: Greeter,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SAY_HELLO {
            let status = Status::unimplemented(format!("unknown method {}", req.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            // Any `tower::Service<tonic::Request<M1>, Response = tonic::Response<M2>,
            // Error = Status>` is a `tonic::server::UnaryService`.
            let method = tower::service_fn(move |request: Request<HelloRequest>| {
                let inner = Arc::clone(&inner);
                async move { inner.say_hello(request).await }
            });
            let codec = ProstCodec::<HelloReply, HelloRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(method, req).await)
        })
    }
}

/// The client side, over a tonic [`Channel`] (HTTP/2).
#[derive(Debug, Clone)]
pub struct GreeterClient {
    inner: Grpc<Channel>,
}

impl GreeterClient {
    /// Connects to a server at `http://{addr}`.
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a socket address makes a valid URI")
            .connect()
            .await?;
        Ok(Self {
            inner: Grpc::new(channel),
        })
    }

    /// Calls `SayHello`. The call returns `Ok` once the reply and an OK
    /// `grpc-status` trailer have arrived.
    pub async fn say_hello(
        &mut self,
        request: impl IntoRequest<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service was not ready: {e}")))?;
        let mut request = request.into_request();
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE, "SayHello"));
        let codec = ProstCodec::<HelloRequest, HelloReply>::default();
        self.inner
            .unary(request, PathAndQuery::from_static(SAY_HELLO), codec)
            .await
    }
}
