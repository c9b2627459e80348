//! The token endpoint of a token-auth registry, as Docker Hub, GHCR and Harbor run it.
//!
//! distribution 2.8 checks a token's `iss` and `aud`, its times, and its signature: the
//! JWT header carries the signing certificate in `x5c`, which must chain to a
//! certificate in the registry's `rootcertbundle`. We sign ES256 (P-256, `r||s`) with a
//! leaf key issued by a CA made for this registry; the CA goes into the bundle.

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::tls::TestCa;

/// Seconds a token is valid.
const TOKEN_LIFETIME_SECS: u64 = 300;

/// How the token endpoint dresses its answers ([`super::Registry::set_token_answer`]).
/// The default is a well-behaved server's; a test of a hostile one sets absurd values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenServerAnswer {
    /// The answer's `expires_in`, as any JSON (default `300`): `9223372036854775808`,
    /// `-1`, `"soon"`.
    pub expires_in: Option<serde_json::Value>,
    /// The JWT's `exp` claim, as any JSON (default now + 300 seconds since the epoch).
    /// distribution checks it: it refuses a token past its `exp`, one whose `exp` is
    /// not an `int64`, and one too far out for Go's time (it wraps into the past); the
    /// year 9999 (`253402300799`) it takes.
    pub exp: Option<serde_json::Value>,
    /// This many bytes of padding in an extra `padding` field: a huge answer.
    pub padding: usize,
}

pub(super) struct TokenIssuer {
    issuer: String,
    service: String,
    user: String,
    password: String,
    /// The one OAuth2 refresh token ("identity token") this server issues and takes.
    refresh_token: String,
    key: EcdsaKeyPair,
    /// The signing certificate, base64 (standard) DER, for the `x5c` header.
    x5c: String,
    root_pem: String,
    rng: SystemRandom,
}

impl TokenIssuer {
    pub(super) fn new(issuer: &str, service: &str, user: String, password: String) -> Result<Self> {
        let ca = TestCa::new().context("generating the token signing CA")?;
        let leaf = ca
            .issue(&["warmroll-token-signer"])
            .context("issuing the token signing certificate")?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &leaf.key_der, &rng)
            .map_err(|e| anyhow!("loading the token signing key: {e}"))?;
        Ok(Self {
            issuer: issuer.to_string(),
            service: service.to_string(),
            user,
            password,
            refresh_token: hex::encode(rand::random::<[u8; 16]>()),
            key,
            x5c: STANDARD.encode(leaf.cert_der.as_ref()),
            root_pem: ca.cert_pem(),
            rng,
        })
    }

    /// The refresh token `docker login` would store as `identitytoken`.
    pub(super) fn refresh_token(&self) -> &str {
        &self.refresh_token
    }

    /// The CA certificate for the registry's `auth.token.rootcertbundle`.
    pub(super) fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Answers `GET /token?service=..&scope=..` (basic credentials) and the OAuth2 form
    /// `POST /token` (`grant_type=password&username=..&password=..`, as containerd
    /// tries first, or `grant_type=refresh_token&refresh_token=..` with the identity
    /// token, as docker and containerd trade one).
    pub(super) async fn handle(
        &self,
        req: Request<Incoming>,
        dress: &TokenServerAnswer,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let mut params: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let mut credentials = basic_credentials(&parts.headers);
        match parts.method {
            Method::GET => {}
            Method::POST => {
                let Ok(body) = body.collect().await else {
                    return json_response(StatusCode::BAD_REQUEST, error_body("bad request body"));
                };
                params.extend(form_urlencoded::parse(&body.to_bytes()).into_owned());
                let field = |name: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                match field("grant_type").as_deref() {
                    Some("password") => credentials = field("username").zip(field("password")),
                    Some("refresh_token") => {
                        credentials = (field("refresh_token").as_deref()
                            == Some(self.refresh_token.as_str()))
                        .then(|| (self.user.clone(), self.password.clone()));
                    }
                    _ => {}
                }
            }
            _ => {
                return json_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    error_body("only GET and POST"),
                );
            }
        }
        let authorized = credentials
            .as_ref()
            .is_some_and(|(u, p)| *u == self.user && *p == self.password);
        if !authorized {
            let mut response = json_response(
                StatusCode::UNAUTHORIZED,
                error_body("invalid username or password"),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"warmroll-testbed-token\""),
            );
            return response;
        }

        let access: Vec<serde_json::Value> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' '))
            .filter_map(parse_scope)
            .collect();
        match self.sign(&access, dress.exp.clone()) {
            Ok(token) => {
                let mut answer = serde_json::json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": dress.expires_in.clone().unwrap_or(TOKEN_LIFETIME_SECS.into()),
                    "issued_at": jiff::Timestamp::now().to_string(),
                });
                if dress.padding > 0 {
                    answer["padding"] = "x".repeat(dress.padding).into();
                }
                json_response(StatusCode::OK, answer)
            }
            Err(e) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_body(&format!("signing token: {e}")),
            ),
        }
    }

    fn sign(&self, access: &[serde_json::Value], exp: Option<serde_json::Value>) -> Result<String> {
        let now = jiff::Timestamp::now().as_second();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": self.user,
            "aud": self.service,
            "exp": exp.unwrap_or((now + TOKEN_LIFETIME_SECS as i64).into()),
            "nbf": now - 10,
            "iat": now,
            "jti": hex::encode(rand::random::<[u8; 12]>()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|e| anyhow!("ECDSA signing: {e}"))?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// `repository:app:pull,push` -> `{"type":"repository","name":"app","actions":[..]}`;
/// every requested action is granted to the one user.
fn parse_scope(scope: &str) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
    Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn error_body(message: &str) -> serde_json::Value {
    serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]})
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
