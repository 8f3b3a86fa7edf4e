//! A gRPC service with tonic, without protoc or a build script: `helloworld.Greeter/SayHello`
//! (tonic's own hello-world), with the message types written by hand with
//! `#[derive(prost::Message)]` and the method wired as tonic's generated code does
//! (`tonic::server::Grpc::unary` with a `UnaryService` and `tonic_prost::ProstCodec`).
//! Served by hyper (HTTP/1.1 and h2c on one port: Consul's HTTP check reads `/health`),
//! registered in Consul like `hello`, deregistered on Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run --example grpc -- --port 0 --consul http://127.0.0.1:8500      # serve
//! cargo run --example grpc -- --call 127.0.0.1:8080 --count 4 --name demo   # call SayHello
//! ```
//! Serving prints `listening on <addr> as <id>` once registered; `--call` prints one line per
//! reply (`hello demo from <id>`) and exits 1 on a gRPC error, printing its status.

#[path = "support/consul.rs"]
mod consul;

use std::convert::Infallible;
use std::future::{ready, Ready};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::{server::UnaryService, Status};
use tonic_prost::ProstCodec;

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `message HelloReply { string message = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

#[derive(Debug, Parser)]
#[command(about = "A gRPC greeter (tonic) that registers itself in Consul")]
struct Args {
    #[command(flatten)]
    registration: consul::Registration,
    /// Consul service name.
    #[arg(long, default_value = "greeter")]
    name: String,
    /// Client mode: call SayHello at this address (host:port, h2c) instead of serving.
    #[arg(long, value_name = "HOST:PORT")]
    call: Option<String>,
    /// Client mode: how many calls (one HTTP/2 connection).
    #[arg(long, default_value_t = 1)]
    count: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(address) = &args.call {
        return call(address, &args.name, args.count).await;
    }
    args.registration.run(&args.name, serve).await
}

/// The `Greeter.SayHello` implementation, in the shape tonic's generated code calls.
#[derive(Clone)]
struct SayHello {
    id: String,
}

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = Ready<Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let name = request.into_inner().name;
        if name.is_empty() {
            return ready(Err(Status::invalid_argument("name is empty")));
        }
        let message = format!("hello {name} from {}", self.id);
        ready(Ok(tonic::Response::new(HelloReply { message })))
    }
}

async fn serve(listener: TcpListener, id: String) {
    let say_hello = SayHello { id };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let say_hello = say_hello.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let say_hello = say_hello.clone();
                async move { Ok::<_, Infallible>(route(say_hello, request).await) }
            });
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(say_hello: SayHello, request: Request<Incoming>) -> Response<Body> {
    match request.uri().path() {
        SAY_HELLO => {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            grpc.unary(say_hello, request).await
        }
        "/health" => Response::new(Body::new(Full::new(Bytes::from_static(b"ok\n")))),
        path => Status::unimplemented(format!("no method {path}")).into_http(),
    }
}

/// Client mode: `count` SayHello calls over one h2c connection, as tonic's generated client
/// makes them.
async fn call(address: &str, name: &str, count: u32) -> anyhow::Result<()> {
    let origin: Uri = format!("http://{address}")
        .parse()
        .with_context(|| format!("--call {address}"))?;
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, Body>(HttpConnector::new());
    let mut grpc = tonic::client::Grpc::with_origin(http, origin);
    for _ in 0..count {
        grpc.ready().await.context("connecting")?;
        let request = tonic::Request::new(HelloRequest {
            name: name.to_owned(),
        });
        let path = PathAndQuery::from_static(SAY_HELLO);
        let codec = ProstCodec::<HelloRequest, HelloReply>::default();
        match grpc.unary(request, path, codec).await {
            Ok(reply) => println!("{}", reply.into_inner().message),
            Err(status) => {
                println!("{:?}: {}", status.code(), status.message());
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
