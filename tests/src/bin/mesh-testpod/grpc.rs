//! `grpc-server` and `grpc-client`: the gRPC health service (grpc.health.v1, whose
//! generated code tonic-health ships) as the L7 tests' gRPC workload.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use http::HeaderValue;
use mesh_tests::l7::GrpcResult;
use mesh_tests::testpod::READY_LINE;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::l7_runtime::{listen, runtime};

/// gRPC status UNAVAILABLE: what a connection failure is reported as.
const CODE_UNAVAILABLE: i32 = 14;
/// gRPC status DEADLINE_EXCEEDED: what a client-side timeout is reported as.
const CODE_DEADLINE_EXCEEDED: i32 = 4;

/// Arguments of `grpc-server`.
#[derive(Args)]
pub struct GrpcServerArgs {
    /// Address to listen on; `[::]:PORT` accepts IPv4 too.
    #[arg(long)]
    listen: SocketAddr,
    /// Pod name: a health service of this name is SERVING (besides ""), and every
    /// response carries it in `x-pod`.
    #[arg(long)]
    name: String,
    /// Flip service NAME between NOT_SERVING and SERVING every this many
    /// milliseconds, so that `watch` sees a stream of updates.
    #[arg(long)]
    flap_ms: Option<u64>,
}

/// The health RPC to call.
#[derive(Clone, Copy, ValueEnum)]
pub enum Call {
    /// Unary `Check`, `--count` times on one channel.
    Check,
    /// Server-streaming `Watch`, until `--count` messages arrived.
    Watch,
}

/// Arguments of `grpc-client`.
#[derive(Args)]
pub struct GrpcClientArgs {
    /// `HOST:PORT` of a gRPC server (h2c).
    #[arg(long)]
    target: String,
    /// The RPC.
    #[arg(long, value_enum)]
    call: Call,
    /// Health service to ask about ("" is the server as a whole).
    #[arg(long, default_value = "")]
    service: String,
    /// Checks to make, or watch messages to wait for.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// Bound on connecting, on each check, and on each watch message.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// Serves grpc.health.v1 until killed.
pub fn serve(args: &GrpcServerArgs) -> Result<()> {
    let pod = HeaderValue::from_str(&args.name)
        .with_context(|| format!("--name {:?} is not a valid header value", args.name))?;
    runtime()?.block_on(async move {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(&args.name, ServingStatus::Serving)
            .await;
        if let Some(ms) = args.flap_ms {
            let (reporter, name) = (reporter.clone(), args.name.clone());
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_millis(ms.max(1)));
                interval.tick().await;
                for serving in [false, true].into_iter().cycle() {
                    interval.tick().await;
                    let status = if serving {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    reporter.set_service_status(&name, status).await;
                }
            });
        }
        let listener = listen(args.listen, false)?;
        println!("{READY_LINE}");
        // Stamps the pod's name on every answer, so that clients see which backend a
        // proxy chose.
        let stamp = tower::util::MapResponseLayer::new(move |mut resp: http::Response<_>| {
            resp.headers_mut().insert("x-pod", pod.clone());
            resp
        });
        Server::builder()
            .layer(stamp)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .with_context(|| format!("serve gRPC on {}", args.listen))
    })
}

/// Makes the calls and prints one [`GrpcResult`] line per result. Failures of the
/// calls are results, not errors: the exit status is 0 once the arguments were valid.
pub fn client(args: &GrpcClientArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let endpoint = Endpoint::from_shared(format!("http://{}", args.target))
        .with_context(|| format!("--target {:?}", args.target))?
        .connect_timeout(timeout);
    runtime()?.block_on(async move {
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return print(&failure(CODE_UNAVAILABLE, format!("connect: {e}"))),
            Err(_) => return print(&failure(CODE_DEADLINE_EXCEEDED, "connect timed out")),
        };
        let mut client = HealthClient::new(channel);
        match args.call {
            Call::Check => check(&mut client, args, timeout).await,
            Call::Watch => watch(&mut client, args, timeout).await,
        }
    })
}

async fn check(
    client: &mut HealthClient<Channel>,
    args: &GrpcClientArgs,
    timeout: Duration,
) -> Result<()> {
    for _ in 0..args.count {
        let result = match tokio::time::timeout(timeout, client.check(request(args, timeout))).await
        {
            Ok(Ok(resp)) => {
                let pod = pod_of(resp.metadata());
                success(resp.get_ref().status().as_str_name(), pod)
            }
            Ok(Err(status)) => from_status(&status),
            Err(_) => failure(CODE_DEADLINE_EXCEEDED, "check timed out"),
        };
        print(&result)?;
    }
    Ok(())
}

async fn watch(
    client: &mut HealthClient<Channel>,
    args: &GrpcClientArgs,
    timeout: Duration,
) -> Result<()> {
    // No grpc-timeout: a watch lives as long as it takes to see --count messages.
    let req = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    let resp = match tokio::time::timeout(timeout, client.watch(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(status)) => return print(&from_status(&status)),
        Err(_) => return print(&failure(CODE_DEADLINE_EXCEEDED, "watch timed out")),
    };
    let pod = pod_of(resp.metadata());
    let mut stream = resp.into_inner();
    for _ in 0..args.count {
        let result = match tokio::time::timeout(timeout, stream.message()).await {
            Ok(Ok(Some(msg))) => success(msg.status().as_str_name(), pod.clone()),
            Ok(Ok(None)) => failure(CODE_UNAVAILABLE, "stream ended"),
            Ok(Err(status)) => from_status(&status),
            Err(_) => failure(CODE_DEADLINE_EXCEEDED, "no watch message in time"),
        };
        let done = !result.ok;
        print(&result)?;
        if done {
            break;
        }
    }
    Ok(())
}

/// A Check request for `--service`, carrying the deadline as `grpc-timeout`.
fn request(args: &GrpcClientArgs, timeout: Duration) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    req.set_timeout(timeout);
    req
}

fn pod_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("x-pod")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn success(status: &str, pod: Option<String>) -> GrpcResult {
    GrpcResult {
        ok: true,
        status: Some(status.to_owned()),
        code: None,
        message: None,
        pod,
    }
}

fn failure(code: i32, message: impl Into<String>) -> GrpcResult {
    GrpcResult {
        ok: false,
        status: None,
        code: Some(code),
        message: Some(message.into()),
        pod: None,
    }
}

fn from_status(status: &tonic::Status) -> GrpcResult {
    GrpcResult {
        pod: pod_of(status.metadata()),
        ..failure(status.code() as i32, status.message())
    }
}

fn print(result: &GrpcResult) -> Result<()> {
    println!("{}", serde_json::to_string(result)?);
    Ok(())
}
