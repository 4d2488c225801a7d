//! The Kubernetes source: cluster state read from the API server (`mesh-agent run
//! --kubernetes`, or `--kubeconfig PATH`), as a DaemonSet's agent does.
//!
//! `kinds` lists what is watched (exactly what the state model reads; the ClusterRole in
//! `deploy/kubernetes` grants exactly that), `client` connects and notes whether the API
//! server answers, `store` keeps the objects of the last complete list plus watch
//! events, `watch` runs one kube-runtime watcher per kind. Objects go, as JSON named
//! `Kind namespace/name (kubernetes)`, through the same parser, validation and planner
//! as files.

pub mod client;
pub mod kinds;
pub mod store;

pub use client::{Connect, ConnectError};
