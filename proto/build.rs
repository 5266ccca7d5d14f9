//! Generates the gRPC server stubs for containerd's snapshots and content services.
//!
//! Only the services are generated here: every message type is reused from `containerd-client`
//! through `extern_path`, so our servers and containerd-client's clients share one set of Rust
//! types and one wire format.

use std::io;

/// Services we implement; each is compiled exactly once.
const PROTOS: &[&str] = &[
    "vendor/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "vendor/github.com/containerd/containerd/api/services/content/v1/content.proto",
];

/// Protobuf packages whose messages `containerd-client` 0.9 already generates, and where (see its
/// `src/lib.rs`). `.google.protobuf` needs no entry: prost maps it to `::prost_types` (and
/// `Empty` to `()`) by default, exactly as containerd-client does.
const EXTERN_PATHS: &[(&str, &str)] = &[
    (
        ".containerd.services.snapshots.v1",
        "::containerd_client::services::v1::snapshots",
    ),
    (
        ".containerd.services.content.v1",
        "::containerd_client::services::v1",
    ),
    (".containerd.types", "::containerd_client::types"),
];

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=vendor");

    let mut builder = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        // protoc 3.21 (Debian) still gates proto3 `optional` behind this flag.
        .protoc_arg("--experimental_allow_proto3_optional");
    for (proto_path, rust_path) in EXTERN_PATHS {
        builder = builder.extern_path(*proto_path, *rust_path);
    }
    builder.compile_protos(PROTOS, &["vendor"])
}
