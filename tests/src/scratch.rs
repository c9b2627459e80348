//! Temp dirs and loopback ports for one test. Every directory the test bed makes is
//! named `warmroll-testbed-*`, so `scripts/check-leftovers` can find anything a test
//! left running or mounted.

use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, Result};
use tempfile::TempDir;

/// Prefix of every temp dir the test bed creates.
pub const TESTBED_PREFIX: &str = "warmroll-testbed-";

/// A fresh temp dir under the system temp dir, removed on drop.
///
/// The path is kept short: unix socket paths are limited to 108 bytes.
pub fn temp_dir(purpose: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{TESTBED_PREFIX}{purpose}-"))
        .tempdir()
        .with_context(|| format!("creating temp dir for {purpose}"))
}

/// Binds a listener on a free loopback port; keep it and hand it to the server so no
/// other test can take the port in between.
pub fn bind_loopback() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").context("binding a loopback port")
}

/// A free loopback address for a server that must bind itself (an external process).
/// The port is released before return; the kernel does not hand it out again soon.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let listener = bind_loopback()?;
    listener.local_addr().context("reading bound address")
}

/// The last `lines` lines of a process's log file, for error messages.
pub fn log_tail(log: &std::path::Path, lines: usize) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all.get(start..).unwrap_or_default().join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}
