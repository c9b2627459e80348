//! Proves the registry test bed: the real CNCF registry behind the counting proxy, its
//! TLS / basic / token variants, fault injection and link shaping, and the image
//! builder's single-arch, multi-arch and random-layer pushes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Fault, FaultRule, Registry, RegistryOptions};
use warmroll_tests::tls::TestCa;

/// distribution answers 404 for OCI manifests a client does not declare it accepts.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// What a raw request got back.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// One HTTP/1.1 request to the registry's public endpoint.
async fn request(
    registry: &Registry,
    method: Method,
    path_and_query: &str,
    authorization: Option<String>,
) -> anyhow::Result<Answer> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, registry.host())
        .header(http::header::ACCEPT, MANIFEST_TYPES);
    if let Some(authorization) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, authorization);
    }
    send(registry, builder.body(Full::new(Bytes::new()))?).await
}

/// `POST path` with a form body.
async fn post_form(registry: &Registry, path: &str, form: String) -> anyhow::Result<Answer> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(http::header::HOST, registry.host())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Full::new(Bytes::from(form)))?;
    send(registry, request).await
}

/// Sends one request on a new connection, over TLS (trusting the registry's CA) when
/// the registry has TLS.
async fn send(registry: &Registry, request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
    let tcp = tokio::net::TcpStream::connect(registry.host()).await?;
    let response = match registry.ca() {
        Some(ca) => {
            let connector = tokio_rustls::TlsConnector::from(ca.client_config()?);
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
            let tls = connector.connect(name, tcp).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            sender.send_request(request).await?
        }
        None => {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender.send_request(request).await?
        }
    };
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// An oci-client client set up for this registry (CA, protocol).
fn oci_client(registry: &Registry) -> Client {
    Client::try_from(registry.oci_client_config()).unwrap()
}

fn registry_auth(registry: &Registry) -> RegistryAuth {
    match registry.credentials() {
        Some((user, password)) => RegistryAuth::Basic(user.into(), password.into()),
        None => RegistryAuth::Anonymous,
    }
}

/// Resolves a tag the way an agent does: one HEAD on the manifest.
async fn resolve(registry: &Registry, reference: &str) -> String {
    let reference: Reference = reference.parse().unwrap();
    oci_client(registry)
        .fetch_manifest_digest(&reference, &registry_auth(registry))
        .await
        .unwrap()
}

#[tokio::test]
async fn push_then_head_resolves_the_tag_and_is_counted() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    assert_eq!(registry.scheme(), "http");
    assert!(registry.host().starts_with("127.0.0.1:"));
    assert_eq!(registry.ca_pem(), None);
    assert_eq!(registry.credentials(), None);

    let builder = ImageBuilder::new(&registry).unwrap();
    let pushed = builder.push("app", "latest").await.unwrap();
    assert_eq!(pushed.reference, format!("{}/app:latest", registry.host()));
    assert!(pushed.manifest_digest.starts_with("sha256:"));
    assert!(pushed.size > 500_000, "busybox layer is in: {pushed:?}");
    assert!(
        registry.count("PUT", "/v2/app/manifests/latest") == 1,
        "the push went through the proxy: {:?}",
        registry.requests()
    );

    registry.reset_requests();
    assert!(registry.requests().is_empty());
    let digest = resolve(&registry, &pushed.reference).await;
    assert_eq!(digest, pushed.manifest_digest);
    assert_eq!(registry.count("HEAD", "/v2/app/manifests/latest"), 1);
    assert_eq!(registry.count("GET", "/v2/app/manifests/latest"), 0);
    let head = registry
        .requests()
        .into_iter()
        .find(|r| r.method == "HEAD")
        .unwrap();
    assert_eq!(head.status, 200);

    // The image content is what the manifest says: the config lists both layers.
    let (manifest, config_digest) = oci_client(&registry)
        .pull_manifest(&pushed.reference.parse().unwrap(), &RegistryAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(config_digest, pushed.manifest_digest);
    let OciManifest::Image(manifest) = manifest else {
        panic!("expected an image manifest");
    };
    assert_eq!(manifest.config.digest, pushed.config_digest);
    assert_eq!(manifest.layers.len(), 2);
}

#[tokio::test]
async fn a_new_build_under_the_same_tag_moves_the_tag() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let first = builder.push("app", "stable").await.unwrap();
    registry.reset_requests();
    let second = builder.push("app", "stable").await.unwrap();

    assert_ne!(first.manifest_digest, second.manifest_digest);
    assert_ne!(first.config_digest, second.config_digest);
    assert_ne!(first.build_id, second.build_id);
    // Only the build-id layer and the config were uploaded again: the base layer was
    // found by HEAD and skipped.
    assert_eq!(
        registry.count("POST", "/v2/app/blobs/uploads/"),
        2,
        "{:#?}",
        registry.requests()
    );
    assert_eq!(
        resolve(&registry, &second.reference).await,
        second.manifest_digest
    );
    // The first build is still there by digest.
    let answer = request(
        &registry,
        Method::HEAD,
        &format!("/v2/app/manifests/{}", first.manifest_digest),
        None,
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn basic_auth_accepts_the_user_and_rejects_bad_credentials() {
    let registry = Registry::start(RegistryOptions::plain().basic("alice", "s3cret"))
        .await
        .unwrap();
    assert_eq!(registry.credentials(), Some(("alice", "s3cret")));

    let none = request(&registry, Method::GET, "/v2/", None).await.unwrap();
    assert_eq!(none.status, 401);
    let challenge = none.headers[http::header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    let bad = request(
        &registry,
        Method::GET,
        "/v2/",
        Some(basic("alice", "wrong")),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 401);
    let unknown = request(&registry, Method::GET, "/v2/", Some(basic("bob", "s3cret")))
        .await
        .unwrap();
    assert_eq!(unknown.status, 401);
    let good = request(
        &registry,
        Method::GET,
        "/v2/",
        Some(basic("alice", "s3cret")),
    )
    .await
    .unwrap();
    assert_eq!(good.status, 200);

    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("app", "v1")
        .await
        .unwrap();
    assert_eq!(
        resolve(&registry, &pushed.reference).await,
        pushed.manifest_digest
    );
    let tags = request(
        &registry,
        Method::GET,
        "/v2/app/tags/list",
        Some(basic("alice", "s3cret")),
    )
    .await
    .unwrap();
    assert_eq!(tags.status, 200);
    let tags: serde_json::Value = serde_json::from_slice(&tags.body).unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}

/// The Bearer challenge flow of Docker Hub/GHCR/Harbor, by hand and through oci-client.
async fn check_token_flow(registry: &Registry) {
    let (user, password) = registry.credentials().unwrap();
    let pushed = ImageBuilder::new(registry)
        .unwrap()
        .push("team/app", "v1")
        .await
        .unwrap();
    assert_eq!(
        resolve(registry, &pushed.reference).await,
        pushed.manifest_digest
    );

    let challenge = request(registry, Method::GET, "/v2/team/app/tags/list", None)
        .await
        .unwrap();
    assert_eq!(challenge.status, 401);
    let header = challenge.headers[http::header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .to_string();
    let realm = format!("{}/token", registry.url());
    assert!(
        header.starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{header}"
    );
    assert!(
        header.contains("scope=\"repository:team/app:pull\""),
        "{header}"
    );
    let service = header
        .split("service=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap();
    let token_path = format!("/token?service={service}&scope=repository%3Ateam%2Fapp%3Apull");

    let bad = request(
        registry,
        Method::GET,
        &token_path,
        Some(basic(user, "nope")),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 401);
    let anonymous = request(registry, Method::GET, &token_path, None)
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401);

    let granted = request(
        registry,
        Method::GET,
        &token_path,
        Some(basic(user, password)),
    )
    .await
    .unwrap();
    assert_eq!(granted.status, 200);
    let granted: serde_json::Value = serde_json::from_slice(&granted.body).unwrap();
    let token = granted["token"].as_str().unwrap();
    assert_eq!(granted["access_token"].as_str(), Some(token));
    assert!(granted["expires_in"].as_u64().unwrap() > 0);

    let tags = request(
        registry,
        Method::GET,
        "/v2/team/app/tags/list",
        Some(format!("Bearer {token}")),
    )
    .await
    .unwrap();
    assert_eq!(tags.status, 200, "{}", String::from_utf8_lossy(&tags.body));
    // A pull token does not allow what it was not granted for.
    let other_repo = request(
        registry,
        Method::GET,
        "/v2/other/tags/list",
        Some(format!("Bearer {token}")),
    )
    .await
    .unwrap();
    assert_eq!(other_repo.status, 401);
    // A forged token (signature of another token) is refused.
    let forged = format!("{}.AAAA", token.rsplit_once('.').unwrap().0);
    let forged = request(
        registry,
        Method::GET,
        "/v2/team/app/tags/list",
        Some(format!("Bearer {forged}")),
    )
    .await
    .unwrap();
    assert_eq!(forged.status, 401);
    // Basic credentials do not work on a token registry.
    let basic_on_token = request(
        registry,
        Method::GET,
        "/v2/team/app/tags/list",
        Some(basic(user, password)),
    )
    .await
    .unwrap();
    assert_eq!(basic_on_token.status, 401);
    assert!(registry.count("GET", "/token") >= 4);

    // The OAuth2 password grant containerd tries first.
    let form = |password: &str| {
        format!(
            "grant_type=password&username={user}&password={password}&service={service}\
             &client_id=containerd&scope=repository%3Ateam%2Fapp%3Apull"
        )
    };
    let posted = post_form(registry, "/token", form(password)).await.unwrap();
    assert_eq!(posted.status, 200);
    let posted: serde_json::Value = serde_json::from_slice(&posted.body).unwrap();
    let token = posted["access_token"].as_str().unwrap();
    let tags = request(
        registry,
        Method::GET,
        "/v2/team/app/tags/list",
        Some(format!("Bearer {token}")),
    )
    .await
    .unwrap();
    assert_eq!(tags.status, 200);
    let refused = post_form(registry, "/token", form("wrong")).await.unwrap();
    assert_eq!(refused.status, 401);
}

#[tokio::test]
async fn token_auth_issues_tokens_the_registry_accepts() {
    let registry = Registry::start(RegistryOptions::plain().token("ci", "t0ken-pass"))
        .await
        .unwrap();
    check_token_flow(&registry).await;
}

#[tokio::test]
async fn token_auth_over_tls() {
    let registry = Registry::start(RegistryOptions::plain().tls().token("ci", "t0ken-pass"))
        .await
        .unwrap();
    assert_eq!(registry.scheme(), "https");
    check_token_flow(&registry).await;
}

#[tokio::test]
async fn tls_registry_is_trusted_only_with_its_ca() {
    let registry = Registry::start(RegistryOptions::plain().tls().basic("alice", "pw"))
        .await
        .unwrap();
    assert_eq!(registry.scheme(), "https");
    let ca_pem = registry.ca_pem().unwrap();
    assert!(ca_pem.contains("BEGIN CERTIFICATE"));

    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("app", "latest")
        .await
        .unwrap();
    assert_eq!(
        resolve(&registry, &pushed.reference).await,
        pushed.manifest_digest
    );
    let bad = request(&registry, Method::GET, "/v2/", Some(basic("alice", "x")))
        .await
        .unwrap();
    assert_eq!(bad.status, 401);

    // A client trusting another CA fails the handshake.
    let stranger = TestCa::new().unwrap();
    let connector = tokio_rustls::TlsConnector::from(stranger.client_config().unwrap());
    let tcp = tokio::net::TcpStream::connect(registry.host())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    assert!(connector.connect(name, tcp).await.is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = oci_client_plain_http(registry.host()).await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
}

async fn oci_client_plain_http(host: &str) -> anyhow::Result<u16> {
    let tcp = tokio::net::TcpStream::connect(host).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::builder()
                .uri("/v2/")
                .header(http::header::HOST, host)
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn multi_arch_index_lists_amd64_and_arm64_children() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let index = builder.push_index("multi", "latest").await.unwrap();
    assert_eq!(
        index.children.keys().collect::<Vec<_>>(),
        ["linux/amd64", "linux/arm64"]
    );
    assert_eq!(
        resolve(&registry, &index.reference).await,
        index.index_digest
    );

    let answer = request(&registry, Method::GET, "/v2/multi/manifests/latest", None)
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let listed: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        listed["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = listed["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    for entry in manifests {
        let platform = format!(
            "{}/{}",
            entry["platform"]["os"].as_str().unwrap(),
            entry["platform"]["architecture"].as_str().unwrap()
        );
        let child = &index.children[&platform];
        assert_eq!(
            entry["digest"].as_str(),
            Some(child.manifest_digest.as_str())
        );
        assert_eq!(
            resolve(&registry, &child.reference).await,
            child.manifest_digest
        );
    }
    let amd64 = &index.children["linux/amd64"];
    let arm64 = &index.children["linux/arm64"];
    assert_ne!(amd64.manifest_digest, arm64.manifest_digest);
    assert_eq!(amd64.build_id, arm64.build_id);

    // oci-client's platform resolution picks the amd64 child on this machine.
    let (_, _, config) = oci_client(&registry)
        .pull_manifest_and_config(&index.reference.parse().unwrap(), &RegistryAuth::Anonymous)
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["architecture"], "amd64");

    // A new build of the index moves the tag and both children.
    let next = builder.push_index("multi", "latest").await.unwrap();
    assert_ne!(next.index_digest, index.index_digest);
    assert_ne!(
        next.children["linux/amd64"].manifest_digest,
        amd64.manifest_digest
    );
}

#[tokio::test]
async fn injected_faults_answer_429_5xx_and_drop_connections() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("app", "latest")
        .await
        .unwrap();
    let path = "/v2/app/manifests/latest";
    registry.reset_requests();

    registry.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after_secs: 7,
        })
        .method("HEAD")
        .path(path)
        .times(2),
    );
    for _ in 0..2 {
        let limited = request(&registry, Method::HEAD, path, None).await.unwrap();
        assert_eq!(limited.status, 429);
        assert_eq!(limited.headers[http::header::RETRY_AFTER], "7");
    }
    // GET is not matched by the HEAD rule, and the rule is used up after two.
    let get = request(&registry, Method::GET, path, None).await.unwrap();
    assert_eq!(get.status, 200);
    let head = request(&registry, Method::HEAD, path, None).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.headers["docker-content-digest"],
        pushed.manifest_digest.as_str()
    );
    let statuses: Vec<u16> = registry.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 200, 200]);

    registry.inject(
        FaultRule::new(Fault::Status(503))
            .path_prefix("/v2/app/")
            .times(1),
    );
    let unavailable = request(&registry, Method::GET, path, None).await.unwrap();
    assert_eq!(unavailable.status, 503);
    let body: serde_json::Value = serde_json::from_slice(&unavailable.body).unwrap();
    assert!(body["errors"].is_array());

    registry.inject(FaultRule::new(Fault::CloseConnection).times(1));
    assert!(request(&registry, Method::GET, path, None).await.is_err());
    assert_eq!(registry.requests().last().unwrap().status, 0);

    registry.set_down(true);
    assert!(request(&registry, Method::GET, path, None).await.is_err());
    registry.set_down(false);
    assert_eq!(
        request(&registry, Method::GET, path, None)
            .await
            .unwrap()
            .status,
        200
    );

    registry.inject(FaultRule::new(Fault::Status(500)));
    assert_eq!(
        request(&registry, Method::GET, "/v2/", None)
            .await
            .unwrap()
            .status,
        500
    );
    registry.clear_faults();
    assert_eq!(
        request(&registry, Method::GET, "/v2/", None)
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn random_layers_stream_through_a_throttled_link() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let size = 3 * 1024 * 1024 + 123;
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push_random("big", "latest", size)
        .await
        .unwrap();
    assert!(pushed.size > size, "{pushed:?}");
    // Uploaded in 4 MiB chunked PATCHes, not one request per small piece.
    let patches = registry
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert!((1..=4).contains(&patches), "{patches} PATCH requests");

    let (manifest, _) = oci_client(&registry)
        .pull_manifest(&pushed.reference.parse().unwrap(), &RegistryAuth::Anonymous)
        .await
        .unwrap();
    let OciManifest::Image(manifest) = manifest else {
        panic!("expected an image manifest");
    };
    let random = manifest.layers.last().unwrap();
    assert_eq!(random.media_type, "application/vnd.oci.image.layer.v1.tar");
    assert!(random.size as u64 > size);

    // 2 MiB/s: the ~3 MiB layer cannot arrive in under ~1.5 s.
    registry.set_bandwidth(Some(2 * 1024 * 1024));
    registry.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    let blob = request(
        &registry,
        Method::GET,
        &format!("/v2/big/blobs/{}", random.digest),
        None,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(blob.status, 200);
    assert_eq!(blob.body.len() as i64, random.size);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&blob.body))),
        random.digest,
        "the blob arrives intact through the shaped link"
    );
    assert!(
        took >= Duration::from_millis(1400),
        "throttled download took only {took:?}"
    );
    // The tar holds random.bin of exactly the asked size.
    let mut archive = tar::Archive::new(blob.body.as_ref());
    let entry = archive.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap().to_str(), Some("random.bin"));
    assert_eq!(entry.header().size().unwrap(), size);
}

#[tokio::test]
async fn dropping_the_registry_closes_its_endpoint() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let host = registry.host().to_string();
    assert_eq!(
        request(&registry, Method::GET, "/v2/", None)
            .await
            .unwrap()
            .status,
        200
    );
    drop(registry);
    tokio::task::yield_now().await;
    assert!(oci_client_plain_http(&host).await.is_err());
}
