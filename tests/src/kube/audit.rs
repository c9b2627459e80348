//! The API server's audit log: one JSON line per request made with ServiceAccount
//! credentials (warmroll's pods, and the controllers, which run with
//! `--use-service-account-credentials`), at `Metadata` level, written when the
//! response is complete.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

/// `--audit-policy-file`.
pub const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

/// One request as the audit log records it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub verb: String,
    pub user: AuditUser,
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    #[serde(default)]
    pub response_status: Option<ResponseStatus>,
    pub request_received_timestamp: jiff::Timestamp,
    pub stage_timestamp: jiff::Timestamp,
    #[serde(default)]
    pub request_uri: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AuditUser {
    #[serde(default)]
    pub username: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub api_group: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ResponseStatus {
    #[serde(default)]
    pub code: u16,
}

impl AuditEvent {
    pub fn resource(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| o.resource.as_str())
    }

    pub fn namespace(&self) -> &str {
        self.object_ref
            .as_ref()
            .map_or("", |o| o.namespace.as_str())
    }

    pub fn name(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| o.name.as_str())
    }

    pub fn code(&self) -> u16 {
        self.response_status.as_ref().map_or(0, |s| s.code)
    }

    /// A write: create, update, patch or delete.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }
}

pub fn read(path: &Path) -> Result<Vec<AuditEvent>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse(text: &str) -> Result<Vec<AuditEvent>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("audit line {}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_audit_line_as_the_api_server_writes_it() {
        let line = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a","stage":"ResponseComplete","requestURI":"/apis/apps/v1/namespaces/demo/deployments/web?fieldManager=warmroll","verb":"patch","user":{"username":"system:serviceaccount:warmroll:warmroll-coordinator","groups":["system:serviceaccounts"]},"sourceIPs":["10.244.0.5"],"objectRef":{"resource":"deployments","namespace":"demo","name":"web","apiGroup":"apps","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2026-12-07T12:00:00.000001Z","stageTimestamp":"2026-12-07T12:00:00.010000Z"}"#;
        let events = parse(&format!("{line}\n\n")).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert!(event.is_write());
        assert_eq!(event.resource(), "deployments");
        assert_eq!(event.namespace(), "demo");
        assert_eq!(event.name(), "web");
        assert_eq!(event.code(), 200);
        assert_eq!(
            event.user.username,
            "system:serviceaccount:warmroll:warmroll-coordinator"
        );
    }
}
