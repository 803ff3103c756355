//! # strata-server
//!
//! The sidecar (`strata-sidecar`): Strata's cache as a gRPC service next to each inference
//! pod, for engines other than ours. The API (`proto/strata/v1/cache.proto`, package
//! `strata.v1`) is engine-neutral: namespaces (model, KV shape, tenant salt) are opened
//! once, then `Lookup`, `Prefetch`, `Put`, `Get` (streamed), `Release`, `Stats` and
//! `Watch` name them by id. Standard `grpc.health.v1` and server reflection are served, so
//! `grpcurl` and clients in any language work without our `.proto`.
//!
//! - **Tiers**: G2 host memory (a memfd-backed [`strata_host_tier::HostPool`]) and, when
//!   configured, G3 disk ([`strata_disk_tier::DiskTier`]) under one
//!   [`strata_cache_core::TieredCache`].
//! - **Listening**: a Unix socket (mode 0600) by default; TCP only with tenant tokens;
//!   TLS (rustls) when a certificate is given. Tokens map to tenants, and a tenant's salt
//!   is part of every key it makes: tenants never see each other's blocks.
//! - **Shared-memory data plane** ([`shm`]): same-host clients map the host pool read-only
//!   and `Get` answers with slot offsets under a lease instead of bytes.
//! - **Limits**: message size, tokens per call, calls in flight per connection, lease
//!   length; each refusal names its setting.
//! - **Client** ([`client::Client`]): the Rust client the engine and the tests use.

pub mod auth;
pub mod client;
pub mod codec;
pub mod config;
pub mod conn;
pub mod gate;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod service;
pub mod shm;
pub mod state;

/// Generated protobuf types, client and server of `strata.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("strata.v1");
}

/// The encoded descriptor set of `strata.v1` (served by reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/strata_descriptor.bin"));

/// Keeps large buffers (blocks are megabytes) in the heap instead of giving each its own
/// mapping: with glibc's defaults every freed 1.5 MiB buffer is unmapped and the next one
/// is mapped and faulted in again, page by page, which costs more than copying the block.
/// Call once at start-up, before threads allocate. No-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator parameters; M_MMAP_THRESHOLD and
        // M_TRIM_THRESHOLD accept any non-negative int, and freed memory stays valid heap.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        }
    }
}

pub use client::Client;
pub use config::SidecarConfig;
pub use server::{Bound, Sidecar};
