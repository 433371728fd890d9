//! The node's client of the registry: the same [`proto`] types the server
//! takes, so the two cannot drift apart without the contract test seeing it.

use std::time::Duration;

use reqwest::StatusCode;

use crate::contract::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer (connection refused, timeout): worth retrying.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// An answer with an error status; `detail` is the problem's detail.
    #[error("registry answered {status}: {detail}")]
    Status { status: u16, detail: String },
    #[error("registry answer not understood: {0}")]
    Decode(String),
}

impl Error {
    /// Whether trying again later may succeed: the registry down or
    /// overloaded, not a request it refused.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable(_) | Error::Decode(_) => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl RegistryClient {
    pub fn new(base_url: &str, token: &str) -> RegistryClient {
        RegistryClient::trusting(base_url, token, None).expect("HTTP client builds")
    }

    /// A client that also trusts the CA certificates of `tls_ca_file`: a
    /// registry with a certificate from the region's own CA.
    pub fn trusting(
        base_url: &str,
        token: &str,
        tls_ca_file: Option<&std::path::Path>,
    ) -> Result<RegistryClient, String> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(crate::tls::CLIENT_POOL_IDLE)
            .tcp_nodelay(true)
            // The registry is reached directly; a proxy from the
            // environment would see every pseudonymous query.
            .no_proxy();
        let http = crate::tls::trust_ca_file(builder, tls_ca_file)?
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(RegistryClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Error::Unreachable(with_causes(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| Error::Unreachable(with_causes(&e)))?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<Problem>(&bytes)
                .map(|p| p.detail)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(Error::Status {
                status: status.as_u16(),
                detail,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    pub async fn publish(
        &self,
        hospital_id: &str,
        request: &PublishRequest,
    ) -> Result<PublishResponse, Error> {
        self.send(
            self.http
                .post(self.url(&format!("/v1/hospitals/{hospital_id}/records")))
                .json(request),
        )
        .await
    }

    pub async fn priors(&self, query: &PriorsQuery) -> Result<PriorsAnswer, Error> {
        self.send(self.http.post(self.url("/v1/priors/query")).json(query))
            .await
    }

    pub async fn add_consent(&self, consent: &NewConsent) -> Result<Consent, Error> {
        self.send(self.http.post(self.url("/v1/consents")).json(consent))
            .await
    }

    pub async fn grant(&self, request: &GrantRequest) -> Result<Grant, Error> {
        self.send(self.http.post(self.url("/v1/grants")).json(request))
            .await
    }

    pub async fn verify_grant(&self, token: &str) -> Result<GrantConfirmed, Error> {
        self.send(
            self.http
                .post(self.url("/v1/grants/verify"))
                .json(&GrantVerify {
                    token: token.to_string(),
                }),
        )
        .await
    }

    pub async fn events(&self, events: &RecognitionEvents) -> Result<EventsAccepted, Error> {
        self.send(
            self.http
                .post(self.url("/v1/recognition/events"))
                .json(events),
        )
        .await
    }

    pub async fn statistics(&self, month: Option<&str>) -> Result<Statistics, Error> {
        // Months are YYYY-MM: nothing to escape.
        let url = match month {
            Some(m) => self.url(&format!("/v1/recognition/statistics?month={m}")),
            None => self.url("/v1/recognition/statistics"),
        };
        self.send(self.http.get(url)).await
    }

    /// The active recognition list's text and content hash, unless it is
    /// still the one `etag` names (`None`: 304 Not Modified).
    pub async fn recognition_list(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(String, String)>, Error> {
        let mut request = self
            .http
            .get(self.url("/v1/recognition-list"))
            .bearer_auth(&self.token);
        if let Some(etag) = etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, format!("\"{etag}\""));
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Unreachable(with_causes(&e)))?;
        match response.status() {
            StatusCode::NOT_MODIFIED => Ok(None),
            s if s.is_success() => {
                let etag = response
                    .headers()
                    .get(reqwest::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string();
                let text = response
                    .text()
                    .await
                    .map_err(|e| Error::Unreachable(with_causes(&e)))?;
                Ok(Some((etag, text)))
            }
            s => Err(Error::Status {
                status: s.as_u16(),
                detail: response.text().await.unwrap_or_default(),
            }),
        }
    }

    /// The directory, unless it still has the version `etag` names (`None`
    /// then: 304 Not Modified).
    pub async fn directory(&self, etag: Option<&str>) -> Result<Option<HospitalDirectory>, Error> {
        let mut request = self
            .http
            .get(self.url("/v1/hospitals"))
            .bearer_auth(&self.token);
        if let Some(etag) = etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, format!("\"{etag}\""));
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Unreachable(with_causes(&e)))?;
        match response.status() {
            StatusCode::NOT_MODIFIED => Ok(None),
            s if s.is_success() => response
                .json()
                .await
                .map(Some)
                .map_err(|e| Error::Decode(e.to_string())),
            s => Err(Error::Status {
                status: s.as_u16(),
                detail: response.text().await.unwrap_or_default(),
            }),
        }
    }
}

/// reqwest's message alone says "error sending request"; the cause (a
/// refused connection, a certificate from an unknown CA) is what an
/// operator needs in the log.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
