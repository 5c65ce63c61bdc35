//! The `sdn.v1` gRPC API. See `sdn/v1/sdn.proto` for every message and field.

/// Generated messages, clients and servers of `sdn.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sdn.v1");
}
