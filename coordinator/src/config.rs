//! The coordinator's configuration file (YAML; the Helm chart renders it into a
//! ConfigMap), parsed into checked types. Every key is documented in
//! `docs/config.example.yaml`. A bad file stops start-up with an error naming the field
//! (`policies.web.warm.threshold: must be between 0 and 1`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use croner::Cron;
use serde::Deserialize;

use crate::window::RolloutWindow;
use crate::workload::{Kind, WorkloadKey};
pub use warmroll_proto::units::parse_duration;

mod notifications;
pub use notifications::{NotifyEvent, NotifyFormat, NotifyReceiver};

/// The default policy label key.
pub const DEFAULT_POLICY_LABEL: &str = "warmroll.io/policy";
/// warmroll's own pod-template annotation key.
pub const WARMROLL_RESTARTED_AT: &str = "warmroll.io/restartedAt";
/// The key `kubectl rollout restart` uses (GitOps tools ignore it in diffs).
pub const KUBECTL_RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("configuration {origin}, line {line}: {reason}")]
    Env {
        origin: String,
        line: usize,
        reason: String,
    },
    #[error("configuration {origin}: {field}: {reason}")]
    Invalid {
        origin: String,
        field: String,
        reason: String,
    },
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The workload label whose value names the policy.
    pub policy_label: String,
    /// Forces every policy into dry-run.
    pub dry_run: bool,
    pub registry: RegistrySettings,
    /// File holding the registry webhook's shared secret; no file, no webhook.
    pub webhook_secret_file: Option<PathBuf>,
    /// Policies by label value.
    pub policies: BTreeMap<String, Policy>,
    /// The namespaces the engine watches labelled workloads in, sorted; empty: all
    /// namespaces. With only Roles (the chart's `rbac.scope: namespaced`), these are the
    /// namespaces that have them.
    pub namespaces: Vec<String>,
    /// Outbound notification receivers (`notifications.receivers`).
    pub notifications: Vec<NotifyReceiver>,
}

/// How the coordinator reaches registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    /// `host[:port]` reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Extra CA bundles (PEM) to trust.
    pub ca_files: Vec<PathBuf>,
    /// Docker `config.json` (file or directory) with registry credentials.
    pub docker_config: Option<PathBuf>,
    /// Credentials written in the configuration (usually as `${ENV}` references).
    pub credentials: Vec<ConfiguredCredential>,
    /// Registries by hostname pattern, each with its own mounted Secret and CA
    /// (kube-autorollout's `registries[]`).
    pub registries: Vec<ConfiguredRegistry>,
}

/// `registry.registries[i]`: the registries a hostname pattern matches, their
/// credentials from a mounted Secret, their CA, and the Artifactory fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredRegistry {
    /// Host glob (`*.corp.example`, `reg:5000`, `host/path`), as credential keys.
    pub hostname_pattern: String,
    /// Directory a Secret is mounted at (a Docker config, a token, or basic auth).
    pub secret_dir: Option<PathBuf>,
    /// The Secret's key holding the token (default `token`).
    pub token_key: Option<String>,
    /// The username for the token, when the Secret has no `username` key.
    pub username: Option<String>,
    /// A CA bundle (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Try JFrog Artifactory's repository-path form when a manifest is not found (or
    /// refused).
    pub artifactory_fallback: bool,
}

/// A credential for the registries a key matches (`host`, `host/path`, `*.host`, as
/// Docker config keys). `Debug` redacts the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredCredential {
    pub registry: String,
    pub credentials: crate::registry::Credentials,
}

/// What a policy does on drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Detect and log only.
    Report,
    /// Warm the new image on the nodes, then roll.
    Rollout,
    /// Roll on a cron schedule.
    Restart,
}

/// What to do when the warm-up times out below the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    Rollout,
    Hold,
}

/// Which nodes a Deployment's or StatefulSet's warm-up pulls on (a DaemonSet's pods are
/// replaced on the nodes they run on, so it always warms those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmTargets {
    /// The nodes running the drifted pods.
    #[default]
    Running,
    /// Those, and every node with a connected agent that the pod template may be
    /// scheduled on (nodeSelector, required node affinity, taints, cordons), so that a
    /// surge or rescheduled pod lands warm too.
    Schedulable,
}

/// Which containers count, by `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicies {
    /// Only `Always` (krar's rule).
    Always,
    /// Every pull policy.
    All,
}

/// Namespaces a policy acts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    All,
    Only(BTreeSet<String>),
}

impl Namespaces {
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Only(set) => set.contains(namespace),
        }
    }
}

/// The warm-up gate.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmPolicy {
    /// Warm the new image on the target nodes before the patch. Off: patch as soon as
    /// drift is decided and send no warm orders (the kubelets pull after the patch, as
    /// with tag-following tools); the other fields are then unused.
    pub enabled: bool,
    /// Share of target nodes that must hold the new digest (0 to 1).
    pub threshold: f64,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    pub targets: WarmTargets,
    /// Warm waves: how many target nodes pull one rollout's images at once.
    pub max_parallel_nodes: ParallelNodes,
}

/// `warm.maxParallelNodes`: how many target nodes of one rollout have warm orders out at
/// once; the next nodes get theirs as earlier ones finish (warm or failed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParallelNodes {
    /// Every target node at once (the default).
    Unlimited,
    /// At most this many nodes (at least 1).
    Count(usize),
    /// At most this share of the target nodes, in percent (above 0, at most 100),
    /// rounded up: never less than one node.
    Percent(f64),
}

impl ParallelNodes {
    /// The cap for a rollout with `targets` target nodes.
    pub fn of(self, targets: usize) -> usize {
        match self {
            ParallelNodes::Unlimited => targets.max(1),
            ParallelNodes::Count(n) => n.max(1),
            ParallelNodes::Percent(p) => {
                // Exact enough: node counts are far below f64's integer range.
                let share = (targets as f64 * p / 100.0).ceil();
                (share as usize).clamp(1, targets.max(1))
            }
        }
    }

    fn parse(raw: RawCount) -> Result<ParallelNodes, String> {
        let text = match raw {
            RawCount::Number(0) => {
                return Err("must be at least 1 (leave it out for no limit)".to_owned());
            }
            RawCount::Number(n) => {
                return usize::try_from(n)
                    .map(ParallelNodes::Count)
                    .map_err(|_| format!("{n} is too large"));
            }
            RawCount::Text(text) => text,
        };
        let trimmed = text.trim();
        if let Some(number) = trimmed.strip_suffix('%') {
            return match number.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(ParallelNodes::Percent(p)),
                _ => Err(format!(
                    "{text:?}: a percentage must be above 0% and at most 100%"
                )),
            };
        }
        match trimmed.parse::<u64>() {
            Ok(n) => ParallelNodes::parse(RawCount::Number(n)),
            Err(_) => Err(format!(
                "{text:?} is neither a number of nodes (2) nor a percentage (\"10%\")"
            )),
        }
    }
}

/// One policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub poll_interval: Duration,
    pub kinds: BTreeSet<Kind>,
    pub namespaces: Namespaces,
    /// Workloads this policy tracks without carrying the label.
    pub targets: Vec<WorkloadKey>,
    pub warm: WarmPolicy,
    /// How long a new digest must stay before warming starts.
    pub stabilization_window: Duration,
    /// Minimum time between two rollouts of one workload.
    pub cooldown: Duration,
    /// How long new pods may take to converge before the rollout counts as held.
    pub rollout_timeout: Duration,
    /// Workloads of this policy rolling at once.
    pub max_concurrent_rollouts: usize,
    /// The pod-template annotation the patch sets.
    pub annotation_key: String,
    pub pull_policies: PullPolicies,
    pub init_containers: bool,
    pub dry_run: bool,
    /// `restart` mode's schedule.
    pub schedule: Option<Cron>,
    /// `rollout` mode: when patches are allowed (`None`: at any time).
    pub window: Option<RolloutWindow>,
    /// `rollout` mode: the patch waits for a `warmroll.io/approve` annotation naming
    /// the new digest (or `warmroll-coordinator approve`).
    pub require_approval: bool,
}

impl Policy {
    /// Whether a template container with this pull policy counts. An absent policy is
    /// what the API server defaults it to: `Always` for `:latest` (and untagged), else
    /// `IfNotPresent`.
    pub fn counts_pull_policy(&self, pull_policy: Option<&str>, image: &str) -> bool {
        match self.pull_policies {
            PullPolicies::All => true,
            PullPolicies::Always => match pull_policy {
                Some(p) => p == "Always",
                None => defaults_to_always(image),
            },
        }
    }
}

/// Replaces each `${NAME}` in `text` by `lookup(NAME)`, for values kept in the
/// environment (a Secret mounted as env vars, say); `$${` stands for a literal `${`.
/// An unset variable, a bad name or an unclosed reference is an error naming the line
/// and the variable, never its value.
pub fn expand_env(
    text: &str,
    origin: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let fail = |reason: String| ConfigError::Env {
            origin: origin.to_owned(),
            line: i + 1,
            reason,
        };
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at..];
            if let Some(tail) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = tail;
            } else if let Some(tail) = after.strip_prefix("${") {
                let end = tail
                    .find('}')
                    .ok_or_else(|| fail("`${` without its closing `}`".to_owned()))?;
                let name = &tail[..end];
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(fail(format!(
                        "`${{{name}}}` is not an environment variable name"
                    )));
                }
                let value = lookup(name)
                    .ok_or_else(|| fail(format!("environment variable {name} is not set")))?;
                out.push_str(&value);
                rest = &tail[end + 1..];
            } else {
                out.push('$');
                rest = &after[1..];
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

fn defaults_to_always(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, tag)) => tag == "latest",
        None => !image.contains('@'),
    }
}

impl Config {
    /// Reads a configuration file, replaces its `${NAME}` references by the process
    /// environment's values (see [`expand_env`]) and checks it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let text = expand_env(&text, &origin, |name| std::env::var(name).ok())?;
        Config::parse(&text, &origin)
    }

    /// Parses and checks configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        raw.check().map_err(|(field, reason)| ConfigError::Invalid {
            origin: origin.to_owned(),
            field,
            reason,
        })
    }
}

// ---- raw (as written) ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    policy_label: Option<String>,
    dry_run: Option<bool>,
    registry: Option<RawRegistry>,
    webhook: Option<RawWebhook>,
    policies: Option<BTreeMap<String, RawPolicy>>,
    namespaces: Option<Vec<String>>,
    notifications: Option<notifications::RawNotifications>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWebhook {
    secret_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRegistry {
    insecure_registries: Option<Vec<String>>,
    ca_files: Option<Vec<PathBuf>>,
    docker_config: Option<PathBuf>,
    credentials: Option<Vec<RawCredential>>,
    registries: Option<Vec<RawConfiguredRegistry>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfiguredRegistry {
    hostname_pattern: Option<String>,
    secret_dir: Option<PathBuf>,
    token_key: Option<String>,
    username: Option<String>,
    ca_file: Option<PathBuf>,
    artifactory_fallback: Option<bool>,
}

impl RawConfiguredRegistry {
    fn check(self, field: &str) -> Checked<ConfiguredRegistry> {
        let pattern = self.hostname_pattern.unwrap_or_default();
        if pattern.trim().is_empty() || pattern.contains(char::is_whitespace) {
            return invalid(
                format!("{field}.hostnamePattern"),
                format!("{pattern:?} is not a host glob (e.g. \"*.corp.example\")"),
            );
        }
        if self.secret_dir.is_none() && (self.token_key.is_some() || self.username.is_some()) {
            return invalid(
                field.to_owned(),
                "tokenKey and username need secretDir (the mounted Secret)",
            );
        }
        Ok(ConfiguredRegistry {
            hostname_pattern: pattern,
            secret_dir: self.secret_dir,
            token_key: self.token_key.filter(|k| !k.is_empty()),
            username: self.username.filter(|u| !u.is_empty()),
            ca_file: self.ca_file,
            artifactory_fallback: self.artifactory_fallback.unwrap_or(false),
        })
    }
}

/// `registry.credentials[i]` as written: `username` and `password`, or `userPass`
/// (`user:password`, krar's `KRAR_REGISTRY_CREDS` form). `Debug` shows no secret.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCredential {
    registry: Option<String>,
    username: Option<String>,
    password: Option<String>,
    user_pass: Option<String>,
    token: Option<String>,
    identity_token: Option<String>,
}

impl std::fmt::Debug for RawCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RawCredential {
    fn check(self, field: &str) -> Checked<ConfiguredCredential> {
        let Some(registry) = self.registry.filter(|r| !r.trim().is_empty()) else {
            return invalid(
                format!("{field}.registry"),
                "missing: the registry host (or glob) it is for",
            );
        };
        use crate::registry::Credentials;
        let credentials = match (
            self.username,
            self.password,
            self.user_pass,
            self.token,
            self.identity_token,
        ) {
            (Some(user), Some(password), None, None, None) if !user.is_empty() => {
                Credentials::new(user, password)
            }
            (None, None, Some(pair), None, None) => match pair.split_once(':') {
                Some((user, password)) if !user.is_empty() => Credentials::new(user, password),
                _ => {
                    return invalid(
                        format!("{field}.userPass"),
                        "is not user:password (the value is not shown)",
                    );
                }
            },
            // kube-autorollout's token: with a username a password (personal access
            // token), without one a bearer token sent as it is.
            (user, None, None, Some(token), None) if !token.is_empty() => {
                match user.filter(|u| !u.is_empty()) {
                    Some(user) => Credentials::new(user, token),
                    None => Credentials::registry_token(token),
                }
            }
            (user, None, None, None, Some(token)) if !token.is_empty() => {
                Credentials::identity_token(user.unwrap_or_default(), token)
            }
            _ => {
                return invalid(
                    field.to_owned(),
                    "needs one of: username and password; userPass; token (username \
                     optional); identityToken (username optional); and no empty value",
                );
            }
        };
        Ok(ConfiguredCredential {
            registry,
            credentials,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    mode: Option<Mode>,
    poll_interval: Option<String>,
    kinds: Option<Vec<String>>,
    namespaces: Option<RawNamespaces>,
    targets: Option<Vec<String>>,
    warm: Option<RawWarm>,
    stabilization_window: Option<String>,
    cooldown: Option<String>,
    rollout_timeout: Option<String>,
    max_concurrent_rollouts: Option<u64>,
    annotation_key: Option<String>,
    pull_policies: Option<PullPolicies>,
    init_containers: Option<bool>,
    dry_run: Option<bool>,
    schedule: Option<String>,
    window: Option<RawWindow>,
    require_approval: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWindow {
    schedule: String,
    duration: String,
    time_zone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawNamespaces {
    Word(String),
    List(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWarm {
    enabled: Option<bool>,
    threshold: Option<f64>,
    timeout: Option<String>,
    on_timeout: Option<OnTimeout>,
    targets: Option<WarmTargets>,
    max_parallel_nodes: Option<RawCount>,
}

/// A count written as a number or a string (`2`, `"10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCount {
    Number(u64),
    Text(String),
}

type Checked<T> = Result<T, (String, String)>;

fn invalid<T>(field: impl Into<String>, reason: impl Into<String>) -> Checked<T> {
    Err((field.into(), reason.into()))
}

impl RawConfig {
    fn check(self) -> Checked<Config> {
        let policy_label = self
            .policy_label
            .unwrap_or_else(|| DEFAULT_POLICY_LABEL.to_owned());
        check_label_key("policyLabel", &policy_label)?;
        let global_dry_run = self.dry_run.unwrap_or(false);
        let registry = self.registry.unwrap_or_default();
        let mut credentials = Vec::new();
        for (i, raw) in registry
            .credentials
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            credentials.push(raw.check(&format!("registry.credentials[{i}]"))?);
        }
        let mut registries = Vec::new();
        for (i, raw) in registry
            .registries
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            registries.push(raw.check(&format!("registry.registries[{i}]"))?);
        }
        let registry = RegistrySettings {
            insecure_registries: registry.insecure_registries.unwrap_or_default(),
            ca_files: registry.ca_files.unwrap_or_default(),
            docker_config: registry.docker_config,
            credentials,
            registries,
        };
        for (i, host) in registry.insecure_registries.iter().enumerate() {
            if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
                return invalid(
                    format!("registry.insecureRegistries[{i}]"),
                    format!("{host:?} is not a host[:port]"),
                );
            }
        }
        let mut policies = BTreeMap::new();
        for (name, raw) in self.policies.unwrap_or_default() {
            let field = format!("policies.{name}");
            check_label_value(&field, &name)?;
            let policy = raw.check(&field, &name, global_dry_run)?;
            policies.insert(name, policy);
        }
        let mut namespaces = self.namespaces.unwrap_or_default();
        for (i, namespace) in namespaces.iter().enumerate() {
            if namespace.is_empty()
                || namespace.len() > 63
                || !namespace
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return invalid(
                    format!("namespaces[{i}]"),
                    format!(
                        "{namespace:?} is not a namespace name (lowercase letters, digits, '-')"
                    ),
                );
            }
        }
        namespaces.sort();
        namespaces.dedup();
        let mut seen = BTreeMap::new();
        for policy in policies.values() {
            // A policy namespace nothing watches would select nothing, silently.
            if let Namespaces::Only(own) = &policy.namespaces
                && !namespaces.is_empty()
                && let Some(outside) = own.iter().find(|n| !namespaces.contains(*n))
            {
                return invalid(
                    format!("policies.{}.namespaces", policy.name),
                    format!(
                        "{outside} is outside the watched namespaces {}",
                        namespaces.join(", ")
                    ),
                );
            }
            for target in &policy.targets {
                if let Some(other) = seen.insert(target.clone(), policy.name.clone()) {
                    return invalid(
                        format!("policies.{}.targets", policy.name),
                        format!("{target} is also a target of policy {other}"),
                    );
                }
                if !namespaces.is_empty() && !namespaces.contains(&target.namespace) {
                    return invalid(
                        format!("policies.{}.targets", policy.name),
                        format!(
                            "{target} is outside the watched namespaces {}",
                            namespaces.join(", ")
                        ),
                    );
                }
            }
        }
        Ok(Config {
            policy_label,
            dry_run: global_dry_run,
            registry,
            webhook_secret_file: self.webhook.and_then(|w| w.secret_file),
            policies,
            namespaces,
            notifications: self.notifications.unwrap_or_default().check()?,
        })
    }
}

impl RawPolicy {
    fn check(self, field: &str, name: &str, global_dry_run: bool) -> Checked<Policy> {
        let Some(mode) = self.mode else {
            return invalid(
                format!("{field}.mode"),
                "missing: one of report, rollout, restart",
            );
        };
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => parse_duration(&text).map_err(|r| (format!("{field}.{key}"), r)),
        };
        let poll_interval = duration("pollInterval", self.poll_interval, Duration::from_secs(60))?;
        if poll_interval < Duration::from_secs(1) {
            return invalid(format!("{field}.pollInterval"), "must be at least 1s");
        }
        let kinds = match self.kinds {
            None => [Kind::Deployment, Kind::StatefulSet, Kind::DaemonSet].into(),
            Some(list) => {
                if list.is_empty() {
                    return invalid(format!("{field}.kinds"), "must name at least one kind");
                }
                let mut kinds = BTreeSet::new();
                for (i, k) in list.iter().enumerate() {
                    let kind = Kind::from_str(k).map_err(|r| (format!("{field}.kinds[{i}]"), r))?;
                    kinds.insert(kind);
                }
                kinds
            }
        };
        let namespaces = match self.namespaces {
            None => Namespaces::All,
            Some(RawNamespaces::Word(w)) if w == "all" => Namespaces::All,
            Some(RawNamespaces::Word(w)) => {
                return invalid(
                    format!("{field}.namespaces"),
                    format!("{w:?}: must be \"all\" or a list of namespaces"),
                );
            }
            Some(RawNamespaces::List(list)) => {
                if list.is_empty() {
                    return invalid(
                        format!("{field}.namespaces"),
                        "an empty list selects nothing; use \"all\" or name namespaces",
                    );
                }
                for (i, ns) in list.iter().enumerate() {
                    if !is_dns_label(ns) {
                        return invalid(
                            format!("{field}.namespaces[{i}]"),
                            format!("{ns:?} is not a namespace name"),
                        );
                    }
                }
                Namespaces::Only(list.into_iter().collect())
            }
        };
        let mut targets = Vec::new();
        for (i, t) in self.targets.unwrap_or_default().iter().enumerate() {
            let key = WorkloadKey::parse(t).map_err(|r| (format!("{field}.targets[{i}]"), r))?;
            if !kinds.contains(&key.kind) {
                return invalid(
                    format!("{field}.targets[{i}]"),
                    format!("{t}: kind {} is not in this policy's kinds", key.kind),
                );
            }
            targets.push(key);
        }
        let raw_warm = self.warm.unwrap_or_default();
        let threshold = raw_warm.threshold.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&threshold) {
            return invalid(format!("{field}.warm.threshold"), "must be between 0 and 1");
        }
        let warm = WarmPolicy {
            enabled: raw_warm.enabled.unwrap_or(true),
            threshold,
            timeout: duration("warm.timeout", raw_warm.timeout, Duration::from_secs(600))?,
            on_timeout: raw_warm.on_timeout.unwrap_or(OnTimeout::Hold),
            targets: raw_warm.targets.unwrap_or_default(),
            max_parallel_nodes: match raw_warm.max_parallel_nodes {
                None => ParallelNodes::Unlimited,
                Some(raw) => ParallelNodes::parse(raw)
                    .map_err(|r| (format!("{field}.warm.maxParallelNodes"), r))?,
            },
        };
        if warm.timeout.is_zero() {
            return invalid(format!("{field}.warm.timeout"), "must be more than 0s");
        }
        let stabilization_window = duration(
            "stabilizationWindow",
            self.stabilization_window,
            Duration::from_secs(30),
        )?;
        let cooldown = duration("cooldown", self.cooldown, Duration::from_secs(300))?;
        let rollout_timeout = duration(
            "rolloutTimeout",
            self.rollout_timeout,
            Duration::from_secs(600),
        )?;
        let max_concurrent_rollouts = match self.max_concurrent_rollouts {
            None => 1,
            Some(0) => {
                return invalid(
                    format!("{field}.maxConcurrentRollouts"),
                    "must be at least 1",
                );
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let annotation_key = self
            .annotation_key
            .unwrap_or_else(|| WARMROLL_RESTARTED_AT.to_owned());
        check_label_key(&format!("{field}.annotationKey"), &annotation_key)?;
        let schedule = match (mode, self.schedule) {
            (Mode::Restart, None) => {
                return invalid(
                    format!("{field}.schedule"),
                    "missing: mode restart needs a cron schedule",
                );
            }
            (Mode::Restart, Some(text)) => Some(
                Cron::from_str(&text)
                    .map_err(|e| (format!("{field}.schedule"), format!("{text:?}: {e}")))?,
            ),
            (_, Some(_)) => {
                return invalid(format!("{field}.schedule"), "only used by mode restart");
            }
            (_, None) => None,
        };
        let window = match self.window {
            None => None,
            Some(_) if mode != Mode::Rollout => {
                return invalid(format!("{field}.window"), "only used by mode rollout");
            }
            Some(raw) => {
                let length = parse_duration(&raw.duration)
                    .map_err(|r| (format!("{field}.window.duration"), r))?;
                Some(
                    RolloutWindow::new(&raw.schedule, length, raw.time_zone.as_deref())
                        .map_err(|(key, r)| (format!("{field}.window.{key}"), r))?,
                )
            }
        };
        let require_approval = self.require_approval.unwrap_or(false);
        if require_approval && mode != Mode::Rollout {
            return invalid(
                format!("{field}.requireApproval"),
                "only used by mode rollout",
            );
        }
        Ok(Policy {
            name: name.to_owned(),
            mode,
            poll_interval,
            kinds,
            namespaces,
            targets,
            warm,
            stabilization_window,
            cooldown,
            rollout_timeout,
            max_concurrent_rollouts,
            annotation_key,
            pull_policies: self.pull_policies.unwrap_or(PullPolicies::All),
            init_containers: self.init_containers.unwrap_or(false),
            dry_run: global_dry_run || self.dry_run.unwrap_or(false),
            schedule,
            window,
            require_approval,
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn check_label_key(field: &str, key: &str) -> Checked<()> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    if !prefix_ok || !is_label_name(name) {
        return invalid(
            field,
            format!("{key:?} is not a Kubernetes label/annotation key (prefix/name)"),
        );
    }
    Ok(())
}

fn check_label_value(field: &str, value: &str) -> Checked<()> {
    if !is_label_name(value) {
        return invalid(
            field,
            "a policy name is a label value: up to 63 letters, digits, '-', '_' or '.'",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
