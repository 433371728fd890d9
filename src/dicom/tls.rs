//! DICOM TLS (PS3.15 B.1, the BCP 195 profile's TLS 1.2/1.3) for the
//! associations the node requests: C-MOVE sub-operations and storage
//! commitment reports to AEs the AE directory marks `tls`; and for the
//! associations it accepts on its DICOM TLS listener (PS3.15 B.9, the BCP
//! 195 TLS Secure Transport Connection Profile), with optional client
//! certificates and the binding of calling AE titles to them.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use rustls::server::danger::ClientCertVerifier;

use crate::config::NodeConfig;
use crate::tls::{ClientAuth, ServerTlsConfig};

/// The client configuration of the associations the node requests: see
/// [`crate::tls::client_config`].
pub fn client_config(config: &NodeConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let ca_file = config
        .tls_ca_file
        .as_ref()
        .ok_or("no tls_ca_file configured")?;
    crate::tls::client_config(
        ca_file,
        config.tls_certificate_file.as_deref(),
        config.tls_private_key_file.as_deref(),
    )
}

/// The identities a verified client certificate carries, set during the
/// handshake of one connection and read when its A-ASSOCIATE-RQ is
/// checked. Unset: no certificate was presented (or client authentication
/// is off).
pub type PeerIdentity = Arc<std::sync::OnceLock<Vec<String>>>;

/// The node's DICOM TLS listener: the shared server certificate and the
/// client certificate verifier.
pub struct DicomTls {
    provider: Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<crate::tls::CertificateResolver>,
    client_auth: ClientAuth,
    client_ca_file: Option<std::path::PathBuf>,
    /// Rebuilt from `client_ca_file` on reload.
    verifier: std::sync::RwLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl DicomTls {
    pub fn new(
        config: &ServerTlsConfig,
        resolver: Arc<crate::tls::CertificateResolver>,
    ) -> Result<Arc<DicomTls>, String> {
        let tls = DicomTls {
            provider: crate::tls::bcp195_provider(),
            resolver,
            client_auth: config.client_auth,
            client_ca_file: config.client_ca_file.clone(),
            verifier: std::sync::RwLock::new(None),
        };
        *tls.verifier.write().expect("verifier lock") = tls.load_verifier()?;
        Ok(Arc::new(tls))
    }

    fn load_verifier(&self) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
        let ca_file = match (self.client_auth, &self.client_ca_file) {
            (ClientAuth::Off, _) => return Ok(None),
            (_, Some(ca_file)) => ca_file,
            (_, None) => return Err("client_auth needs client_ca_file".into()),
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::read_certificates(ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca_file.display()))?;
        }
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        );
        let builder = match self.client_auth {
            ClientAuth::Optional => builder.allow_unauthenticated(),
            _ => builder,
        };
        builder
            .build()
            .map(Some)
            .map_err(|e| format!("{}: {e}", ca_file.display()))
    }

    /// The configuration of one connection: its verifier records the
    /// identities of the certificate it verified into the returned slot.
    /// A configuration per connection is what ties a certificate to the
    /// A-ASSOCIATE-RQ that follows it on the same connection.
    pub fn connection_config(&self) -> Result<(Arc<rustls::ServerConfig>, PeerIdentity), String> {
        let identity = PeerIdentity::default();
        let verifier = self.verifier.read().expect("verifier lock").clone();
        let recording = verifier.map(|inner| {
            Arc::new(RecordIdentity {
                inner,
                identity: identity.clone(),
            }) as Arc<dyn ClientCertVerifier>
        });
        Ok((self.server_config(recording)?, identity))
    }

    /// A configuration that records nothing: for the handshake that only
    /// carries an A-ASSOCIATE-RJ past the association limit.
    pub fn handshake_config(&self) -> Arc<rustls::ServerConfig> {
        let verifier = self.verifier.read().expect("verifier lock").clone();
        self.server_config(verifier)
            .expect("the BCP 195 versions are supported by the provider")
    }

    fn server_config(
        &self,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(crate::tls::PROTOCOL_VERSIONS)
            .map_err(|e| e.to_string())?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.resolver.clone());
        // No session resumption: a resumed session skips the client
        // certificate check, which would leave the AE binding nothing to
        // compare. A DICOM association is long; a full handshake is cheap
        // beside it.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

impl crate::tls::Reload for DicomTls {
    /// The server certificate is the shared resolver's (reloaded on its
    /// own); here the CA certificates that client certificates chain to.
    fn reload(&self) -> Result<(), String> {
        let verifier = self.load_verifier()?;
        *self.verifier.write().expect("verifier lock") = verifier;
        Ok(())
    }
}

/// The configured verifier, remembering what the certificate it accepted
/// says about its holder.
#[derive(Debug)]
struct RecordIdentity {
    inner: Arc<dyn ClientCertVerifier>,
    identity: PeerIdentity,
}

impl ClientCertVerifier for RecordIdentity {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let _ = self.identity.set(certificate_identities(end_entity));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// The subject CNs and the subjectAltNames (DNS names, IP addresses,
/// e-mail addresses) of a certificate, as text. A certificate rustls
/// accepted but x509-cert cannot parse yields none, so it matches no
/// binding.
pub fn certificate_identities(der: &[u8]) -> Vec<String> {
    use x509_cert::der::{Decode, Tag, Tagged};
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut identities = Vec::new();
    let common_name = x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            let text_tag = matches!(
                atv.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            );
            if atv.oid == common_name
                && text_tag
                && let Ok(cn) = std::str::from_utf8(atv.value.value())
            {
                identities.push(cn.to_string());
            }
        }
    }
    if let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() {
        for name in san.0 {
            match name {
                GeneralName::DnsName(dns) => identities.push(dns.to_string()),
                GeneralName::Rfc822Name(email) => identities.push(email.to_string()),
                GeneralName::IpAddress(ip) => match ip.as_bytes().len() {
                    4 => {
                        let b: [u8; 4] = ip.as_bytes().try_into().expect("4 bytes");
                        identities.push(std::net::IpAddr::from(b).to_string());
                    }
                    16 => {
                        let b: [u8; 16] = ip.as_bytes().try_into().expect("16 bytes");
                        identities.push(std::net::IpAddr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    identities
}

/// Which certificate identity each bound calling AE title must present.
#[derive(Debug, Default)]
pub struct AeBinding {
    entries: Vec<(String, String)>,
}

impl AeBinding {
    pub fn from_config(config: Option<&ServerTlsConfig>) -> AeBinding {
        AeBinding {
            entries: config
                .map(|c| {
                    c.ae_binding
                        .iter()
                        .map(|(ae, id)| (ae.trim().to_string(), id.trim().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// `presented`: the identities of the caller's verified certificate,
    /// `None` without one (no TLS, or no certificate). A bound AE title
    /// must present its identity; a certificate bound to one AE title may
    /// not call as another. Identities compare without regard to ASCII
    /// case (DNS names and CNs are case-insensitive).
    pub fn check(
        &self,
        calling_ae_title: &str,
        presented: Option<&[String]>,
    ) -> Result<(), String> {
        let presented = presented.unwrap_or(&[]);
        let carries = |identity: &str| presented.iter().any(|p| p.eq_ignore_ascii_case(identity));
        let bound: Vec<&str> = self
            .entries
            .iter()
            .filter(|(ae, _)| ae == calling_ae_title)
            .map(|(_, id)| id.as_str())
            .collect();
        if !bound.is_empty() {
            if bound.iter().any(|id| carries(id)) {
                return Ok(());
            }
            return Err(match presented.is_empty() {
                true => format!(
                    "{calling_ae_title} is bound to the certificate of {}; none was presented",
                    bound.join(" or ")
                ),
                false => format!(
                    "{calling_ae_title} is bound to the certificate of {}; the certificate presented is {}",
                    bound.join(" or "),
                    presented.join(", ")
                ),
            });
        }
        if let Some((other, id)) = self.entries.iter().find(|(_, id)| carries(id)) {
            return Err(format!(
                "the certificate of {id} is bound to {other}, not to {calling_ae_title}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ae_binding() {
        let binding = AeBinding {
            entries: vec![
                ("CT1".into(), "ct1.hospital-a.example".into()),
                ("MR1".into(), "10.1.2.3".into()),
            ],
        };
        let ct1 = vec![
            "CT1 modality".to_string(),
            "ct1.hospital-a.example".to_string(),
        ];
        let mr1 = vec!["10.1.2.3".to_string()];
        let other = vec!["workstation-7".to_string()];
        let cases: &[(&str, Option<&[String]>, bool)] = &[
            ("CT1", Some(&ct1), true),
            ("CT1", Some(&other), false),
            ("CT1", None, false),
            ("MR1", Some(&mr1), true),
            ("MR1", Some(&ct1), false),
            // A bound certificate cannot borrow an unbound AE title.
            ("WS7", Some(&ct1), false),
            ("WS7", Some(&other), true),
            ("WS7", None, true),
        ];
        for (ae, presented, ok) in cases {
            let result = binding.check(ae, *presented);
            assert_eq!(result.is_ok(), *ok, "{ae} {presented:?}: {result:?}");
        }
        let upper = vec!["CT1.HOSPITAL-A.EXAMPLE".to_string()];
        assert!(binding.check("CT1", Some(&upper)).is_ok());
        assert!(AeBinding::default().check("ANY", None).is_ok());
    }
}
