//! What anyone who can reach `serve` sends: the bytes go through the HTTP
//! server as configured (limits, content negotiation, basic auth) on an
//! in-memory connection, and must get an answer or a closed connection.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracer_user::serve::{
    http::{self, Health},
    metrics::{Exporter, Metrics},
    web_config::WebConfig,
};

/// A user "fuzz" with the password "fuzz" (bcrypt at its lowest cost).
static WEB_CONFIG: LazyLock<String> = LazyLock::new(|| {
    let hash = bcrypt::hash("fuzz", 4).unwrap();
    format!("basic_auth_users:\n  fuzz: {hash}\n")
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
});

fuzz_target!(|data: &[u8]| {
    let metrics = Arc::new(Metrics::new(Exporter::new(10), "tracepoint"));
    let health = Arc::new(Health::new());
    let web = Arc::new(WebConfig::parse(&WEB_CONFIG, std::path::Path::new("/")).unwrap());
    let open = data.first().is_some_and(|b| b & 1 == 0);
    let web = if open {
        Arc::new(WebConfig::open())
    } else {
        web
    };
    RUNTIME.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let graceful = GracefulShutdown::new();
        let service = http::service(metrics, health, web);
        let served = tokio::spawn(http::serve_connection(
            TokioIo::new(server),
            service,
            graceful.watcher(),
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut answer)).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(1), served).await;
    });
});
