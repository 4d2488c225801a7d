//! `mesh-agent` (library): the node agent of a sidecar-less, kernel-native service mesh.
//!
//! Layout: `cli` (commands), `app` (the `run` loop), `ca` (the mesh's root CA and the
//! nodes' intermediates, `mesh-agent ca`), `admin` (the Unix-socket API for
//! flows and policy, and its client), `flows` (policy verdict events, named), `report`
//! (the flow records and policy report `admin` serves), `state` (cluster objects, their
//! decoding and validation), `source` (where they come from: files, etcd, the Kubernetes
//! API), `plan` (state → desired map contents, pure), `reconcile` (state → plan →
//! maps), `datapath` (load, attach, pin, diff-apply maps, read them back, destroy stale
//! sockets), `health` (active backend probes), `metrics` + `telemetry` (Prometheus), `status`
//! (the datapath at a glance),
//! `watch` (file change notification), `sys` (the only unsafe code: safe wrappers of a
//! few system calls).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod ca;
pub mod certs;
pub mod cli;
pub mod datapath;
pub mod etcdctl;
pub mod flows;
pub mod health;
pub mod metrics;
pub mod plan;
pub mod proxyfeed;
pub mod reconcile;
pub mod report;
pub mod source;
pub mod state;
pub mod status;
mod sys;
pub mod telemetry;
pub mod watch;
