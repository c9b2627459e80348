use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.yaml")
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_example_file_parses() {
    let text = include_str!("../../../docs/config.example.yaml");
    let config = parse(text).unwrap();
    assert_eq!(config.policy_label, DEFAULT_POLICY_LABEL);
    let web = &config.policies["web"];
    assert_eq!(web.mode, Mode::Rollout);
    assert_eq!(web.poll_interval, Duration::from_secs(60));
    assert_eq!(web.warm.timeout, Duration::from_secs(600));
    assert!(web.window.is_some());
    assert!(!web.require_approval);
    let nightly = &config.policies["nightly"];
    assert_eq!(nightly.mode, Mode::Restart);
    assert!(nightly.schedule.is_some());
    assert!(nightly.namespaces.contains("batch"));
    assert!(!nightly.namespaces.contains("default"));
    let watch = &config.policies["watch-only"];
    assert_eq!(
        watch.targets,
        [WorkloadKey::new(
            "default",
            Kind::Deployment,
            "legacy-frontend"
        )]
    );
}

#[test]
fn defaults() {
    let config = parse("").unwrap();
    assert_eq!(config.policy_label, "warmroll.io/policy");
    assert!(config.policies.is_empty());
    assert!(!config.dry_run);
    assert_eq!(config.registry, RegistrySettings::default());

    let config = parse("policies:\n  p:\n    mode: rollout\n").unwrap();
    let p = &config.policies["p"];
    assert_eq!(p.name, "p");
    assert_eq!(p.poll_interval, Duration::from_secs(60));
    assert_eq!(p.kinds.len(), 3);
    assert_eq!(p.namespaces, Namespaces::All);
    assert!(p.targets.is_empty());
    assert!(p.warm.enabled);
    assert_eq!(p.warm.threshold, 1.0);
    assert_eq!(p.warm.timeout, Duration::from_secs(600));
    assert_eq!(p.warm.on_timeout, OnTimeout::Hold);
    assert_eq!(p.warm.targets, WarmTargets::Running);
    assert_eq!(p.stabilization_window, Duration::from_secs(30));
    assert_eq!(p.cooldown, Duration::from_secs(300));
    assert_eq!(p.rollout_timeout, Duration::from_secs(600));
    assert_eq!(p.max_concurrent_rollouts, 1);
    assert_eq!(p.annotation_key, WARMROLL_RESTARTED_AT);
    assert_eq!(p.pull_policies, PullPolicies::All);
    assert!(!p.init_containers);
    assert!(!p.dry_run);
    assert!(p.schedule.is_none());
}

#[test]
fn every_key_is_read() {
    let config = parse(
        r#"
policyLabel: krar.slash-mnt.com/rollout-policy
dryRun: true
registry:
  insecureRegistries: ["reg.local:5000"]
  caFiles: [/etc/ca.pem]
  dockerConfig: /etc/docker
webhook:
  secretFile: /etc/warmroll/webhook/secret
policies:
  web:
    mode: report
    pollInterval: 1m30s
    kinds: [StatefulSet]
    namespaces: [a, b]
    targets: [a/StatefulSet/db]
    warm: {threshold: 0.5, timeout: 2m, onTimeout: rollout, targets: schedulable}
    stabilizationWindow: 0s
    cooldown: 1h
    rolloutTimeout: 3m
    maxConcurrentRollouts: 4
    annotationKey: kubectl.kubernetes.io/restartedAt
    pullPolicies: always
    initContainers: true
"#,
    )
    .unwrap();
    assert_eq!(config.policy_label, "krar.slash-mnt.com/rollout-policy");
    assert_eq!(config.registry.insecure_registries, ["reg.local:5000"]);
    assert_eq!(config.registry.ca_files, [PathBuf::from("/etc/ca.pem")]);
    assert_eq!(
        config.registry.docker_config,
        Some(PathBuf::from("/etc/docker"))
    );
    assert_eq!(
        config.webhook_secret_file,
        Some(PathBuf::from("/etc/warmroll/webhook/secret"))
    );
    let p = &config.policies["web"];
    assert_eq!(p.mode, Mode::Report);
    assert_eq!(p.poll_interval, Duration::from_secs(90));
    assert_eq!(p.kinds, [Kind::StatefulSet].into());
    assert_eq!(
        p.namespaces,
        Namespaces::Only(["a".to_owned(), "b".to_owned()].into())
    );
    assert_eq!(p.warm.threshold, 0.5);
    assert_eq!(p.warm.timeout, Duration::from_secs(120));
    assert_eq!(p.warm.on_timeout, OnTimeout::Rollout);
    assert_eq!(p.warm.targets, WarmTargets::Schedulable);
    assert_eq!(p.stabilization_window, Duration::ZERO);
    assert_eq!(p.cooldown, Duration::from_secs(3600));
    assert_eq!(p.rollout_timeout, Duration::from_secs(180));
    assert_eq!(p.max_concurrent_rollouts, 4);
    assert_eq!(p.annotation_key, KUBECTL_RESTARTED_AT);
    assert_eq!(p.pull_policies, PullPolicies::Always);
    assert!(p.init_containers);
    // The global dryRun forces every policy.
    assert!(p.dry_run);
}

#[test]
fn every_validation_error_names_its_field() {
    let cases: &[(&str, &str)] = &[
        ("bogus: 1\n", "unknown field"),
        ("webhook:\n  secret: x\n", "unknown field"),
        (
            "policies:\n  p:\n    mode: rollout\n    colour: red\n",
            "unknown field",
        ),
        ("policies:\n  p:\n    mode: sometimes\n", "sometimes"),
        (
            "policies:\n  p:\n    mode: rollout\n    warm: {treshold: 1}\n",
            "unknown field",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    warm: {enabled: maybe}\n",
            "maybe",
        ),
        ("policyLabel: 'bad key!'\n", "policyLabel:"),
        (
            "policies:\n  p:\n    mode: rollout\n    window: {schedule: 'often', duration: 1h}\n",
            "policies.p.window.schedule: \"often\"",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    window: {schedule: '0 3 * * *', duration: 0s}\n",
            "policies.p.window.duration:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    window: {schedule: '0 3 * * *', duration: 1h, timeZone: Moon/Base}\n",
            "policies.p.window.timeZone: \"Moon/Base\"",
        ),
        (
            "policies:\n  p:\n    mode: report\n    window: {schedule: '0 3 * * *', duration: 1h}\n",
            "policies.p.window: only used by mode rollout",
        ),
        (
            "policies:\n  p:\n    mode: report\n    requireApproval: true\n",
            "policies.p.requireApproval: only used by mode rollout",
        ),
        (
            "registry:\n  insecureRegistries: ['http://x']\n",
            "registry.insecureRegistries[0]:",
        ),
        (
            "policies:\n  'bad name!':\n    mode: rollout\n",
            "policies.bad name!:",
        ),
        ("policies:\n  p: {}\n", "policies.p.mode: missing"),
        (
            "policies:\n  p:\n    mode: rollout\n    pollInterval: soon\n",
            "policies.p.pollInterval:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    pollInterval: 0s\n",
            "policies.p.pollInterval: must be at least 1s",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    kinds: []\n",
            "policies.p.kinds:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    kinds: [Pod]\n",
            "policies.p.kinds[0]:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    namespaces: some\n",
            "policies.p.namespaces:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    namespaces: []\n",
            "policies.p.namespaces:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    namespaces: [Bad_NS]\n",
            "policies.p.namespaces[0]:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    targets: [a/b]\n",
            "policies.p.targets[0]:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    kinds: [Deployment]\n    targets: [a/DaemonSet/b]\n",
            "policies.p.targets[0]:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    targets: [a/Deployment/b]\n  q:\n    mode: report\n    targets: [a/Deployment/b]\n",
            "policies.q.targets:",
        ),
        (
            "policies:\n  web:\n    mode: rollout\n    warm: {threshold: 1.5}\n",
            "policies.web.warm.threshold: must be between 0 and 1",
        ),
        ("namespaces: [Shop]\n", "namespaces[0]:"),
        ("namespaces: [ok, '']\n", "namespaces[1]:"),
        (
            "namespaces: [shop]\npolicies:\n  p:\n    mode: rollout\n    targets: [other/Deployment/b]\n",
            "policies.p.targets: other/Deployment/b is outside the watched namespaces shop",
        ),
        (
            "namespaces: [shop]\npolicies:\n  p:\n    mode: report\n    namespaces: [shop, blog]\n",
            "policies.p.namespaces: blog is outside the watched namespaces shop",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    warm: {timeout: 0s}\n",
            "policies.p.warm.timeout:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    warm: {onTimeout: wait}\n",
            "wait",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    warm: {targets: everywhere}\n",
            "everywhere",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    stabilizationWindow: -5s\n",
            "policies.p.stabilizationWindow: \"-5s\": must not be negative",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    cooldown: x\n",
            "policies.p.cooldown:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    rolloutTimeout: x\n",
            "policies.p.rolloutTimeout:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    maxConcurrentRollouts: 0\n",
            "policies.p.maxConcurrentRollouts:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    annotationKey: 'no good/'\n",
            "policies.p.annotationKey:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    pullPolicies: never\n",
            "never",
        ),
        (
            "policies:\n  p:\n    mode: restart\n",
            "policies.p.schedule: missing",
        ),
        (
            "policies:\n  p:\n    mode: restart\n    schedule: 'every day'\n",
            "policies.p.schedule:",
        ),
        (
            "policies:\n  p:\n    mode: rollout\n    schedule: '0 3 * * *'\n",
            "policies.p.schedule: only used by mode restart",
        ),
        ("policies: [1, 2]\n", "test.yaml"),
    ];
    for (text, expected) in cases {
        let message = error(text);
        assert!(
            message.contains(expected),
            "{text:?}: {message:?} does not contain {expected:?}"
        );
        assert!(message.contains("test.yaml"), "{message}");
    }
}

#[test]
fn warm_up_can_be_turned_off() {
    let config = parse("policies:\n  p:\n    mode: rollout\n    warm: {enabled: false}\n").unwrap();
    let p = &config.policies["p"];
    assert!(!p.warm.enabled);
    // The gate's own keys keep their defaults (and are unused).
    assert_eq!(p.warm.threshold, 1.0);
    let config = parse("policies:\n  p:\n    mode: rollout\n    warm: {enabled: true}\n").unwrap();
    assert!(config.policies["p"].warm.enabled);
}

#[test]
fn integer_threshold_parses() {
    // Helm renders `threshold: 1.0` as `threshold: 1`.
    let config = parse("policies:\n  p:\n    mode: rollout\n    warm: {threshold: 1}\n").unwrap();
    assert_eq!(config.policies["p"].warm.threshold, 1.0);
    let config = parse("policies:\n  p:\n    mode: rollout\n    warm: {threshold: 0}\n").unwrap();
    assert_eq!(config.policies["p"].warm.threshold, 0.0);
}

#[test]
fn load_names_a_missing_file() {
    let err = Config::load(Path::new("/nonexistent/warmroll.yaml")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/warmroll.yaml"),
        "{err}"
    );
}

#[test]
fn pull_policy_rule() {
    let mut p = parse("policies:\n  p:\n    mode: rollout\n    pullPolicies: always\n")
        .unwrap()
        .policies
        .remove("p")
        .unwrap();
    assert!(p.counts_pull_policy(Some("Always"), "app:v1"));
    assert!(!p.counts_pull_policy(Some("IfNotPresent"), "app:latest"));
    assert!(p.counts_pull_policy(None, "app:latest"));
    assert!(p.counts_pull_policy(None, "reg:5000/app"));
    assert!(!p.counts_pull_policy(None, "reg:5000/app:v1"));
    p.pull_policies = PullPolicies::All;
    assert!(p.counts_pull_policy(Some("IfNotPresent"), "app:v1"));
}

#[test]
fn namespaces_are_sorted_and_deduplicated_and_default_to_all() {
    assert!(parse("{}\n").unwrap().namespaces.is_empty());
    let config = parse("namespaces: [shop, blog, shop]\n").unwrap();
    assert_eq!(config.namespaces, ["blog", "shop"]);
}

#[test]
fn env_references_expand_and_name_what_is_missing() {
    let env = |name: &str| match name {
        "REGISTRY" => Some("reg.local:5000".to_owned()),
        "TOKEN" => Some("s3cret".to_owned()),
        _ => None,
    };
    let text = "registry:\n  insecureRegistries: [\"${REGISTRY}\"]\n# $${LITERAL} and $5\n";
    let expanded = expand_env(text, "t", env).unwrap();
    assert_eq!(
        expanded,
        "registry:\n  insecureRegistries: [\"reg.local:5000\"]\n# ${LITERAL} and $5\n"
    );
    let config = Config::parse(&expanded, "t").unwrap();
    assert_eq!(config.registry.insecure_registries, ["reg.local:5000"]);

    let missing = expand_env("a: 1\nb: ${NOPE}\n", "t", env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        missing,
        "configuration t, line 2: environment variable NOPE is not set"
    );
    let bad = expand_env("x: ${1X}\n", "t", env).unwrap_err().to_string();
    assert!(
        bad.contains("line 1") && bad.contains("not an environment variable name"),
        "{bad}"
    );
    let open = expand_env("x: ${TOKEN\n", "t", env)
        .unwrap_err()
        .to_string();
    assert!(open.contains("without its closing"), "{open}");
    assert!(
        !open.contains("s3cret"),
        "values never appear in errors: {open}"
    );
}

#[test]
fn configured_credentials_take_both_forms_and_never_show_the_password() {
    let config = parse(
        "registry:\n  credentials:\n    - registry: '*.example.com'\n      username: puller\n      password: s3cret\n    - registry: ghcr.io\n      userPass: 'bot:t0ken:with:colons'\n",
    )
    .unwrap();
    let creds = &config.registry.credentials;
    assert_eq!(creds.len(), 2);
    assert_eq!(creds[0].registry, "*.example.com");
    assert_eq!(creds[0].credentials.username(), "puller");
    assert_eq!(creds[1].credentials.username(), "bot");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("t0ken"),
        "{shown}"
    );

    for (text, field) in [
        (
            "registry:\n  credentials:\n    - username: a\n      password: b\n",
            "registry.credentials[0].registry:",
        ),
        (
            "registry:\n  credentials:\n    - registry: r\n      userPass: nocolon\n",
            "registry.credentials[0].userPass:",
        ),
        (
            "registry:\n  credentials:\n    - registry: r\n      username: a\n",
            "registry.credentials[0]:",
        ),
        (
            "registry:\n  credentials:\n    - registry: r\n      username: a\n      password: b\n      userPass: 'a:b'\n",
            "registry.credentials[0]:",
        ),
    ] {
        let e = error(text);
        assert!(e.contains(field), "{e}");
        assert!(!e.contains("nocolon"), "values stay out of errors: {e}");
    }
}

#[test]
fn warm_waves_take_a_node_count_or_a_share_of_the_target_nodes() {
    let cap = |value: &str| {
        parse(&format!(
            "policies:\n  p:\n    mode: rollout\n    warm: {{maxParallelNodes: {value}}}\n"
        ))
        .map(|c| c.policies["p"].warm.max_parallel_nodes)
    };
    let default = parse("policies:\n  p:\n    mode: rollout\n").unwrap();
    assert_eq!(
        default.policies["p"].warm.max_parallel_nodes,
        ParallelNodes::Unlimited
    );
    assert_eq!(ParallelNodes::Unlimited.of(5000), 5000);
    assert_eq!(cap("2").unwrap(), ParallelNodes::Count(2));
    assert_eq!(cap("'3'").unwrap(), ParallelNodes::Count(3));
    assert_eq!(cap("'10%'").unwrap(), ParallelNodes::Percent(10.0));
    assert_eq!(cap("'0.5%'").unwrap().of(5000), 25);
    // Rounded up, never below one node, never above the targets.
    assert_eq!(ParallelNodes::Percent(10.0).of(5000), 500);
    assert_eq!(ParallelNodes::Percent(10.0).of(5), 1);
    assert_eq!(ParallelNodes::Percent(50.0).of(5), 3);
    assert_eq!(ParallelNodes::Percent(100.0).of(0), 1);
    assert_eq!(ParallelNodes::Count(2).of(5), 2);
    for (value, says) in [
        ("0", "must be at least 1"),
        ("'0%'", "above 0%"),
        ("'150%'", "at most 100%"),
        ("'many'", "neither a number of nodes"),
    ] {
        let e = cap(value).unwrap_err().to_string();
        assert!(
            e.contains("policies.p.warm.maxParallelNodes"),
            "{value}: {e}"
        );
        assert!(e.contains(says), "{value}: {e}");
    }
    assert!(cap("-1").is_err(), "a negative count is refused");
}

#[test]
fn configured_tokens_and_registries_by_hostname_pattern() {
    use crate::registry::Credentials;
    let config = parse(
        "registry:\n  credentials:\n    - registry: a.io\n      token: bearer-1\n    - registry: b.io\n      username: octo\n      token: pat-2\n    - registry: c.io\n      identityToken: refresh-3\n  registries:\n    - hostnamePattern: '*.jfrog.example'\n      secretDir: /etc/warmroll/registries/0\n      tokenKey: IDENTITY_TOKEN\n      caFile: /etc/warmroll/registries/0-ca/ca.crt\n      artifactoryFallback: true\n    - hostnamePattern: ghcr.io\n      secretDir: /etc/warmroll/registries/1\n      username: octo\n    - hostnamePattern: plain.example\n",
    )
    .unwrap();
    let creds = &config.registry.credentials;
    assert_eq!(
        creds[0].credentials,
        Credentials::registry_token("bearer-1")
    );
    assert_eq!(creds[1].credentials, Credentials::new("octo", "pat-2"));
    assert_eq!(
        creds[2].credentials,
        Credentials::identity_token("", "refresh-3")
    );
    let shown = format!("{config:?}");
    for secret in ["bearer-1", "pat-2", "refresh-3"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    let registries = &config.registry.registries;
    assert_eq!(registries.len(), 3);
    assert_eq!(registries[0].hostname_pattern, "*.jfrog.example");
    assert_eq!(registries[0].token_key.as_deref(), Some("IDENTITY_TOKEN"));
    assert!(registries[0].artifactory_fallback);
    assert_eq!(
        registries[0].ca_file.as_deref(),
        Some(Path::new("/etc/warmroll/registries/0-ca/ca.crt"))
    );
    assert_eq!(registries[1].username.as_deref(), Some("octo"));
    assert!(!registries[1].artifactory_fallback);
    assert_eq!(registries[2].secret_dir, None);

    for (text, field) in [
        (
            "registry:\n  credentials:\n    - registry: r\n      token: ''\n",
            "registry.credentials[0]:",
        ),
        (
            "registry:\n  credentials:\n    - registry: r\n      password: p\n      token: t\n",
            "registry.credentials[0]:",
        ),
        (
            "registry:\n  registries:\n    - secretDir: /x\n",
            "registry.registries[0].hostnamePattern:",
        ),
        (
            "registry:\n  registries:\n    - hostnamePattern: r.io\n      tokenKey: T\n",
            "registry.registries[0]:",
        ),
        (
            "registry:\n  registries:\n    - hostnamePattern: r.io\n      hostname: x\n",
            "hostname",
        ),
    ] {
        let e = error(text);
        assert!(e.contains(field), "{e}");
    }
}
