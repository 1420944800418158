//! The generated Envoy types are exactly what prost-build makes of Envoy's .proto files: this test
//! generates them again and fails on any difference. `TRELLIS_BLESS=1 cargo test -p
//! trellis-envoy-api --test bootstrap` writes them instead (after adding a file to `PROTOS`).
//!
//! The .proto files come from the envoy-types package cargo has already fetched for the agent (its
//! version is the one in Cargo.lock), so the Envoy API version of both stays the same.

#![allow(
    clippy::disallowed_methods,
    reason = "the generator reads the .proto files and writes Rust: the crate's own code stays pure"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The Envoy API files whose messages translation builds; their imports come along.
const PROTOS: &[&str] = &[
    "envoy/config/accesslog/v3/accesslog.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/filters/http/health_check/v3/health_check.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

/// Include roots inside envoy-types' `proto/` directory.
const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// envoy-types' `proto/` directory in cargo's registry sources, at the locked version.
fn proto_root() -> PathBuf {
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).expect("Cargo.lock");
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .expect("envoy-types in Cargo.lock");
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let registries = std::fs::read_dir(home.join("registry/src")).expect("cargo registry sources");
    registries
        .flatten()
        .map(|r| r.path().join(format!("envoy-types-{version}/proto")))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| panic!("envoy-types {version} sources not found under {home:?}"))
}

fn generate(out: &Path) {
    let root = proto_root();
    let includes: Vec<PathBuf> = INCLUDES.iter().map(|i| root.join(i)).collect();
    let files = protox::compile(PROTOS, &includes).expect("Envoy protos compile");
    let mut config = prost_build::Config::new();
    config
        .out_dir(out)
        // Well-known types as plain messages of our own, as envoy-types has them, so wrappers stay
        // messages (`UInt32Value { value }`) and `Any` is a message like any other.
        .compile_well_known_types()
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com")
        // Envoy's comments are reStructuredText with code blocks rustdoc would run as tests.
        .disable_comments(["."])
        .include_file("mod.rs");
    config.compile_fds(files).expect("prost-build");
}

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .expect("read generated dir")
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (
                name,
                std::fs::read_to_string(e.path()).expect("read generated file"),
            )
        })
        .collect()
}

#[test]
fn generated_code_matches_the_envoy_protos() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/generated");
    let scratch = std::env::temp_dir().join(format!("trellis-envoy-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    generate(&scratch);
    let fresh = read_dir(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);

    if std::env::var_os("TRELLIS_BLESS").is_some() {
        let _ = std::fs::remove_dir_all(&committed);
        std::fs::create_dir_all(&committed).expect("generated dir");
        for (name, text) in &fresh {
            std::fs::write(committed.join(name), text).expect("write generated file");
        }
        return;
    }
    let old = read_dir(&committed);
    let stale: Vec<&String> = fresh
        .keys()
        .chain(old.keys())
        .filter(|name| fresh.get(*name) != old.get(*name))
        .collect();
    assert!(
        stale.is_empty(),
        "envoy-api/src/generated is out of date in {stale:?}: run \
         TRELLIS_BLESS=1 cargo test -p trellis-envoy-api --test bootstrap"
    );
}
