//! How `warmroll-coordinator report` and `approve` read a coordinator's HTTP port, which
//! wants a Kubernetes bearer token allowed to `get` the path ([`super::auth`]). The token,
//! in this order:
//!
//! 1. `--token` / `WARMROLL_TOKEN`, as given;
//! 2. with the caller's kubeconfig (or in-cluster configuration): a 10-minute token of
//!    the reader ServiceAccount the chart creates (`--reader-service-account`), through
//!    the TokenRequest API. The caller's RBAC decides (`create` on `serviceaccounts/token`
//!    of that account, which cluster admins have), and the caller's own credentials,
//!    often an administrator's, are not handed to the coordinator;
//! 3. when that request is forbidden (403) or the account does not exist (404): the
//!    kubeconfig's own bearer token (its `token`, `tokenFile`, or what its exec plugin
//!    returns), so someone RBAC lets read the paths directly (the reader ClusterRole
//!    bound to them) still can;
//! 4. otherwise none (a client-certificate kubeconfig whose user may not mint the
//!    token, or no kubeconfig at all): a coordinator with the check off answers, one
//!    with it on answers 401, and the error says which credentials were tried.

use axum::http::{HeaderValue, Request, Response, header};
use clap::Args;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use kube::api::{Api, PostParams};
use kube::client::ConfigExt as _;
use tower::{Layer as _, ServiceExt as _};
use tracing::debug;

use crate::engine::ReportError;
use crate::run::{ServiceAccount, parse_service_account};

/// Lifetime asked for the reader token: the API server's minimum.
pub const READER_TOKEN_SECONDS: i64 = 600;

/// Where a coordinator's HTTP port is, and how to get in.
#[derive(Debug, Clone, Args)]
pub struct ReaderArgs {
    /// Base URL of a running coordinator's HTTP server.
    #[arg(long, env = "WARMROLL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token to present to the coordinator, instead of one obtained with the
    /// kubeconfig (prefer the variable: a flag shows in the process list).
    #[arg(long, env = "WARMROLL_TOKEN", hide_env_values = true, value_parser = BearerToken::parse)]
    pub token: Option<BearerToken>,
    /// The ServiceAccount (namespace:name) whose 10-minute token is requested with your
    /// kubeconfig (TokenRequest; RBAC: create on serviceaccounts/token): the chart's
    /// reader account. If that is forbidden or the account does not exist, the
    /// kubeconfig's own bearer token is sent.
    #[arg(
        long,
        env = "WARMROLL_READER_SERVICE_ACCOUNT",
        default_value = "warmroll:warmroll-reader",
        value_parser = parse_service_account
    )]
    pub reader_service_account: ServiceAccount,
}

/// A bearer token; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// A token as given (surrounding white space removed); it must fit in a header.
    pub fn parse(text: &str) -> Result<BearerToken, String> {
        let token = text.trim();
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token has characters other than visible ASCII".into());
        }
        Ok(BearerToken(token.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The token to present, and where it came from (for messages; never the token).
#[derive(Debug, Clone)]
pub struct Credential {
    token: Option<BearerToken>,
    source: String,
}

impl Credential {
    /// Presents `token`, described as `source`.
    pub fn token(token: BearerToken, source: impl Into<String>) -> Credential {
        Credential {
            token: Some(token),
            source: source.into(),
        }
    }

    /// Presents nothing, `why` says why.
    pub fn none(why: impl Into<String>) -> Credential {
        Credential {
            token: None,
            source: why.into(),
        }
    }

    pub fn bearer(&self) -> Option<&BearerToken> {
        self.token.as_ref()
    }

    /// What is presented: "the token of --token", "no token (…)".
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl ReaderArgs {
    /// The credential to present ([module docs](self)).
    pub async fn credential(&self) -> Result<Credential, ReportError> {
        if let Some(token) = &self.token {
            return Ok(Credential::token(
                token.clone(),
                "the token of --token (WARMROLL_TOKEN)",
            ));
        }
        match kube::Config::infer().await {
            Ok(config) => from_kubeconfig(config, &self.reader_service_account).await,
            Err(e) => Ok(Credential::none(format!(
                "no token: no kubeconfig or in-cluster configuration ({e}); pass --token"
            ))),
        }
    }
}

/// Whether a refused TokenRequest falls back to the kubeconfig's own token: when RBAC
/// forbids it or the account does not exist, not when the API server is unreachable or
/// failing (a passing fault must not send the caller's credentials instead).
pub fn falls_back(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 403 || status.code == 404)
}

/// The token of an `Authorization` header value, if it is `Bearer <token>`.
pub fn bearer_of(value: &HeaderValue) -> Option<BearerToken> {
    let text = value.to_str().ok()?;
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    BearerToken::parse(token).ok()
}

/// Steps 2 to 4 of the [module docs](self) with `config`.
pub async fn from_kubeconfig(
    config: kube::Config,
    reader: &ServiceAccount,
) -> Result<Credential, ReportError> {
    let account = format!("{}:{}", reader.namespace, reader.name);
    let client = kube::Client::try_from(config.clone()).map_err(ReportError::KubeClient)?;
    let refused = match request_token(client, reader).await {
        Ok(token) => {
            return Ok(Credential::token(
                token,
                format!(
                    "a {READER_TOKEN_SECONDS}-second token of ServiceAccount {account} (TokenRequest with your kubeconfig)"
                ),
            ));
        }
        Err(e) if falls_back(&e) => e,
        Err(source) => return Err(ReportError::TokenRequest { account, source }),
    };
    let why = match &refused {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    };
    debug!(%account, reason = %why, "TokenRequest refused; trying the kubeconfig's own token");
    Ok(match kubeconfig_bearer(&config).await? {
        Some(token) => Credential::token(
            token,
            format!(
                "your kubeconfig's own bearer token (a token of ServiceAccount {account} was refused: {why})"
            ),
        ),
        None => Credential::none(format!(
            "no token: a token of ServiceAccount {account} was refused ({why}) and the kubeconfig has no bearer token; pass --token"
        )),
    })
}

async fn request_token(
    client: kube::Client,
    reader: &ServiceAccount,
) -> Result<BearerToken, kube::Error> {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client, &reader.namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            // No audiences: the API server's own, which the coordinator's TokenReview
            // checks.
            expiration_seconds: Some(READER_TOKEN_SECONDS),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(&reader.name, &PostParams::default(), &request)
        .await?;
    let token = answer.status.and_then(|s| s.token).unwrap_or_default();
    BearerToken::parse(&token).map_err(|why| {
        kube::Error::Service(format!("the TokenRequest answered no usable token: {why}").into())
    })
}

/// The bearer token the kubeconfig's user presents to its API server, as kube's own
/// client would send it (a `token`, a `tokenFile`, an exec plugin's answer); `None`
/// for client certificates (and basic auth).
async fn kubeconfig_bearer(config: &kube::Config) -> Result<Option<BearerToken>, ReportError> {
    let layer = config
        .auth_layer()
        .map_err(|e| ReportError::KubeconfigToken(e.to_string()))?;
    let Some(layer) = layer else {
        return Ok(None);
    };
    // The layer wraps a service that answers with the header it was given.
    let capture = tower::service_fn(|request: Request<kube::client::Body>| async move {
        let header = request.headers().get(header::AUTHORIZATION).cloned();
        Ok::<_, tower::BoxError>(Response::new(header))
    });
    let request = Request::new(kube::client::Body::empty());
    let answer = layer
        .layer(capture)
        .oneshot(request)
        .await
        .map_err(|e| ReportError::KubeconfigToken(e.to_string()))?;
    Ok(answer.body().as_ref().and_then(bearer_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_must_be_header_text_and_never_shown() {
        let token = BearerToken::parse(" abc.def \n").unwrap();
        assert_eq!(token.expose(), "abc.def");
        assert_eq!(format!("{token:?}"), "BearerToken(<redacted>)");
        assert!(!format!("{:?}", Credential::token(token, "x")).contains("abc"));
        assert!(BearerToken::parse("  ").is_err());
        assert!(BearerToken::parse("a b").is_err());
        assert!(BearerToken::parse("tök").is_err());
    }

    #[test]
    fn only_bearer_headers_give_a_token() {
        let header = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            bearer_of(&header("Bearer abc")).map(|t| t.expose().to_owned()),
            Some("abc".into())
        );
        assert!(bearer_of(&header("Basic dXNlcjpwYXNz")).is_none());
        assert!(bearer_of(&header("Bearer ")).is_none());
    }

    #[test]
    fn only_forbidden_or_missing_accounts_fall_back_to_the_kubeconfig_token() {
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(falls_back(&api(403)));
        assert!(falls_back(&api(404)));
        assert!(!falls_back(&api(500)));
        assert!(!falls_back(&api(401)));
        assert!(!falls_back(&kube::Error::Service(
            "connection refused".into()
        )));
    }

    #[test]
    fn flags_parse_with_defaults_and_the_token_stays_hidden() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            reader: ReaderArgs,
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.reader.url, "http://127.0.0.1:8080");
        assert!(cli.reader.token.is_none());
        assert_eq!(
            cli.reader.reader_service_account,
            ServiceAccount {
                namespace: "warmroll".into(),
                name: "warmroll-reader".into()
            }
        );
        let cli = Cli::try_parse_from([
            "x",
            "--token",
            "sekret",
            "--reader-service-account",
            "ops:reader",
        ])
        .unwrap();
        assert_eq!(
            cli.reader.token.as_ref().map(BearerToken::expose),
            Some("sekret")
        );
        assert!(!format!("{:?}", cli.reader).contains("sekret"));
        assert_eq!(cli.reader.reader_service_account.namespace, "ops");
        assert!(Cli::try_parse_from(["x", "--reader-service-account", "reader"]).is_err());
    }

    #[tokio::test]
    async fn the_kubeconfig_bearer_token_is_what_kube_would_send() {
        let config = |auth: serde_json::Value| {
            let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
            config.auth_info = serde_json::from_value(auth).unwrap();
            config
        };
        let token = kubeconfig_bearer(&config(serde_json::json!({"token": "from-config"})))
            .await
            .unwrap();
        assert_eq!(
            token.map(|t| t.expose().to_owned()),
            Some("from-config".into())
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file").unwrap();
        let token = kubeconfig_bearer(&config(serde_json::json!({"tokenFile": file})))
            .await
            .unwrap();
        assert_eq!(
            token.map(|t| t.expose().to_owned()),
            Some("from-file".into())
        );

        // An exec plugin (client-go's ExecCredential), run as kubectl would.
        let plugin = dir.path().join("plugin.sh");
        std::fs::write(
            &plugin,
            "#!/bin/sh\necho '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{\"token\":\"from-exec\"}}'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exec = serde_json::json!({"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": plugin,
            "interactiveMode": "Never",
        }});
        let token = kubeconfig_bearer(&config(exec)).await.unwrap();
        assert_eq!(
            token.map(|t| t.expose().to_owned()),
            Some("from-exec".into())
        );

        // Client certificates and basic auth: no bearer token.
        let certs =
            serde_json::json!({"client-certificate-data": "eA==", "client-key-data": "eA=="});
        assert!(kubeconfig_bearer(&config(certs)).await.unwrap().is_none());
        let basic = serde_json::json!({"username": "u", "password": "p"});
        assert!(kubeconfig_bearer(&config(basic)).await.unwrap().is_none());
    }
}
