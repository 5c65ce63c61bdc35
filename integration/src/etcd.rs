//! A generated client for the subset of etcd's v3 API the benchmarks use.

#![allow(clippy::all, missing_docs)]
tonic::include_proto!("etcdserverpb");
