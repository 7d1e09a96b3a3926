//! The two ways to a certificate, as library functions the CLI and the running proxy share:
//! first retrieval with transfer IDs ([`request`]), renewal signed with the certificate in
//! service ([`renew`]), and finishing a retrieval the service already accepted ([`resume`]).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use super::client::{Service, ServiceError};
use super::keys::{self, KeyError, NewKey, CERT_FILE, KEY_FILE};
use super::xml::{self, Customer, FieldError, Operation};
use crate::business_id::{BusinessId, BusinessIdError};
use crate::identity::{rfc3339, unix, CertInfo, Identity};

/// Renewal is accepted from this many days before the current certificate's notAfter.
pub const RENEWAL_WINDOW_DAYS: i64 = 60;

/// What to do about an expired certificate, said wherever one is met.
pub const EXPIRED_CANNOT_RENEW: &str =
    "an expired certificate cannot be renewed: request a new one with new transfer IDs (cert request)";

/// A certificate the service issued, written to disk.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `cert.pem`: the leaf, then the chain.
    pub cert_path: PathBuf,
    /// `key.pem`: the new key (PKCS#8, mode 0600).
    pub key_path: PathBuf,
    /// The service's retrieval ID.
    pub retrieval_id: String,
    /// The issued leaf.
    pub certificate: CertificateDer<'static>,
}

/// The one-time transfer credentials of a first retrieval.
pub struct Transfer {
    /// `TransferId`.
    pub id: String,
    /// `TransferPassword`.
    pub password: zeroize::Zeroizing<String>,
}

/// Why no certificate came.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// A value the service would refuse.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A malformed business ID.
    #[error("--customer-id: {0}")]
    BusinessId(#[from] BusinessIdError),
    /// The output directory is not usable.
    #[error("{0}")]
    Output(String),
    /// The key, CSR or a file failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The current certificate cannot be renewed now.
    #[error("{0}")]
    NotRenewable(String),
    /// The service call failed before the service accepted anything.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The service accepted the request (a retrieval ID exists), then something failed.
    #[error(
        "{source}\nThe certificate service accepted the request: RetrievalId {retrieval_id}.{}\n\
         The new key is kept in {}. Finish the retrieval later with: {resume}",
        if *.transfer_ids_used { " The transfer IDs are now used up: they cannot be used again." } else { "" },
        key_path.display()
    )]
    Accepted {
        /// The retrieval ID to finish with.
        retrieval_id: String,
        /// Where the new key is.
        key_path: PathBuf,
        /// Whether one-time transfer IDs were consumed (first retrieval).
        transfer_ids_used: bool,
        /// How to resume.
        resume: String,
        /// What failed.
        source: Box<FlowError>,
    },
    /// The request may have reached the service, but no trusted answer came back.
    #[error(
        "{source}. No trusted answer came back, so it is not known whether the certificate service \
         accepted the request{}. The new key stays in {}; a new attempt replaces it (cert request \
         and cert renew: --force).",
        if *.transfer_ids { " (if it did, the one-time transfer IDs are used up)" } else { "" },
        key_path.display()
    )]
    Unconfirmed {
        /// Where the new key is.
        key_path: PathBuf,
        /// Whether one-time transfer IDs were sent (first retrieval).
        transfer_ids: bool,
        /// What failed.
        source: ServiceError,
    },
    /// The returned certificate is not for the new key.
    #[error("the certificate the service returned is not for the new key in {0}")]
    WrongKey(PathBuf),
}

/// Checks that `out` exists (creating it, mode 0700) and holds no `cert.pem`/`key.pem`,
/// unless `force`.
pub fn prepare_out(out: &Path, force: bool) -> Result<(), FlowError> {
    if !out.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(out).map_err(|e| {
            FlowError::Output(format!("cannot create --out {}: {e}", out.display()))
        })?;
    }
    if !out.is_dir() {
        return Err(FlowError::Output(format!(
            "--out {} is not a directory",
            out.display()
        )));
    }
    if !force {
        for f in [CERT_FILE, KEY_FILE] {
            if out.join(f).exists() {
                return Err(FlowError::Output(format!(
                    "{} already exists: refusing to overwrite it (it may be a certificate in use, or \
                     the key of a retrieval still to finish with --retrieval-id). Choose another \
                     --out, or pass --force to replace it.",
                    out.join(f).display()
                )));
            }
        }
    }
    Ok(())
}

fn business_id(customer: &Customer) -> Result<BusinessId, FlowError> {
    customer.validate()?;
    Ok(customer.customer_id.parse()?)
}

/// First retrieval: a new key written to `out` first, a CSR, SignNewCertificate with the
/// transfer IDs, then GetCertificate until the certificate comes; writes `cert.pem`.
/// `resume_hint` is the command line shown if the retrieval must be finished later.
pub async fn request(
    svc: &Service,
    customer: &Customer,
    transfer: &Transfer,
    out: &Path,
    resume_hint: &str,
) -> Result<Issued, FlowError> {
    let id = business_id(customer)?;
    submit(
        svc,
        customer,
        &id,
        Operation::SignNew,
        out,
        resume_hint,
        |csr| {
            Ok(xml::sign_new_request(
                customer,
                &transfer.id,
                &transfer.password,
                csr,
            )?)
        },
    )
    .await
}

/// Renewal with the identity in service (`current`, still valid and at most 60 days from its
/// end): a new key written to `out` first, a CSR, RenewCertificate signed with the current
/// key, then GetCertificate; writes `cert.pem`. `out` must not be where `current` lives.
pub async fn renew(
    svc: &Service,
    customer: &Customer,
    current: &Identity,
    out: &Path,
    now: SystemTime,
    resume_hint: &str,
) -> Result<Issued, FlowError> {
    renewable(current, now)?;
    let id = business_id(customer)?;
    if current.info.organisation != Some(id) {
        return Err(FlowError::NotRenewable(format!(
            "the current certificate ({}) is not for --customer-id {id}: the service renews only \
             a certificate whose CN is the business ID",
            current.info.who()
        )));
    }
    let chain = &current.certified_key.cert;
    submit(
        svc,
        customer,
        &id,
        Operation::Renew,
        out,
        resume_hint,
        |csr| {
            let unsigned = xml::renew_request_unsigned(customer, csr)?;
            super::dsig::sign_enveloped(
                &unsigned,
                current.certified_key.key.as_ref(),
                &chain[..1.min(chain.len())],
            )
            .map_err(|e| FlowError::NotRenewable(format!("cannot sign the renewal request: {e}")))
        },
    )
    .await
}

/// The part of [`request`] and [`renew`] after the checks: a new key and its CSR, the request
/// element `element` makes of the CSR, the key written to `out` before anything is sent, then
/// the call and the retrieval.
async fn submit(
    svc: &Service,
    customer: &Customer,
    id: &BusinessId,
    op: Operation,
    out: &Path,
    resume_hint: &str,
    element: impl FnOnce(&[u8]) -> Result<String, FlowError>,
) -> Result<Issued, FlowError> {
    let key = NewKey::generate()?;
    let csr = key.csr(id, customer.customer_name.as_deref())?;
    let element = element(&csr)?;
    let key_path = keys::write_key(out, &key)?;
    let retrieval_id = send(svc, op, &element, &key_path).await?;
    let transfer_ids_used = matches!(op, Operation::SignNew);
    finish(
        svc,
        customer,
        &key,
        out,
        retrieval_id,
        key_path,
        transfer_ids_used,
        resume_hint,
    )
    .await
}

/// Finishes a retrieval the service accepted earlier, with the key kept in `out/key.pem`.
pub async fn resume(
    svc: &Service,
    customer: &Customer,
    retrieval_id: &str,
    out: &Path,
    resume_hint: &str,
) -> Result<Issued, FlowError> {
    business_id(customer)?;
    let key_path = out.join(KEY_FILE);
    let key = NewKey::read(&key_path)?;
    finish(
        svc,
        customer,
        &key,
        out,
        retrieval_id.to_string(),
        key_path,
        false,
        resume_hint,
    )
    .await
}

/// The customer fields for renewing `current` in `environment`: `CustomerId` is the
/// certificate's CN (the business ID), as the automatic renewal in a running proxy needs.
pub fn customer_of(
    environment: crate::vero_ca::Environment,
    current: &Identity,
    customer_name: Option<String>,
) -> Result<Customer, FlowError> {
    // The CN, read once when the identity was loaded; a CN that is not a business ID is as
    // useless here as none.
    let id = current.info.organisation.ok_or_else(|| {
        FlowError::NotRenewable(format!(
            "the current certificate ({}) has no business ID in its CN: the certificate service \
             renews only a certificate whose CN is the business ID",
            current.info.who()
        ))
    })?;
    Ok(Customer {
        environment,
        customer_id: id.to_string(),
        customer_name,
    })
}

/// When the certificate service starts accepting a renewal of `cert` (Unix seconds):
/// [`RENEWAL_WINDOW_DAYS`] before its notAfter.
pub fn renewal_opens(cert: &CertInfo) -> i64 {
    cert.not_after - RENEWAL_WINDOW_DAYS * 86_400
}

/// Whether `current` may be renewed at `now`; the refusal says why and when.
pub fn renewable(current: &Identity, now: SystemTime) -> Result<(), FlowError> {
    let t = unix(now);
    if t > current.info.not_after {
        return Err(FlowError::NotRenewable(format!(
            "the certificate ({}) expired {}: {EXPIRED_CANNOT_RENEW}",
            current.info.who(),
            rfc3339(current.info.not_after)
        )));
    }
    let opens = renewal_opens(&current.info);
    if t < opens {
        return Err(FlowError::NotRenewable(format!(
            "the certificate ({}) is valid until {}; the certificate service renews only from {} days \
             before that, from {} on. Try again then.",
            current.info.who(),
            rfc3339(current.info.not_after),
            RENEWAL_WINDOW_DAYS,
            rfc3339(opens)
        )));
    }
    Ok(())
}

/// Sends SignNew or Renew. A signed refusal means nothing was accepted: the new key, written
/// before the call so that no acceptance can happen without it on disk, is removed again so a
/// retry needs no --force. After any other failure it stays (the service may have accepted).
async fn send(
    svc: &Service,
    op: Operation,
    element: &str,
    key_path: &Path,
) -> Result<String, FlowError> {
    let result = match svc.call(op, element).await {
        Ok(answer) => accepted(answer),
        Err(e) => Err(e.into()),
    };
    match result {
        // Refused, or never sent: nothing can have been accepted with this key.
        Err(FlowError::Service(
            e @ (ServiceError::Refused(_) | ServiceError::Unreachable { .. }),
        )) => {
            let _ = std::fs::remove_file(key_path);
            Err(e.into())
        }
        Err(FlowError::Service(e)) => Err(FlowError::Unconfirmed {
            key_path: key_path.to_path_buf(),
            transfer_ids: matches!(op, Operation::SignNew),
            source: e,
        }),
        other => other,
    }
}

fn accepted(answer: super::answer::Answer) -> Result<String, FlowError> {
    if !answer.result.ok {
        return Err(ServiceError::Refused(answer.result).into());
    }
    match answer.retrieval_id {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(ServiceError::Parse(super::answer::ParseError::Shape(
            "Status OK but no RetrievalId".into(),
        ))
        .into()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    svc: &Service,
    customer: &Customer,
    key: &NewKey,
    out: &Path,
    retrieval_id: String,
    key_path: PathBuf,
    transfer_ids_used: bool,
    resume_hint: &str,
) -> Result<Issued, FlowError> {
    let wrap = |source: FlowError| FlowError::Accepted {
        retrieval_id: retrieval_id.clone(),
        key_path: key_path.clone(),
        transfer_ids_used,
        resume: resume_hint.replace("{retrieval_id}", &retrieval_id),
        source: Box::new(source),
    };
    let leaf = svc
        .poll_certificate(customer, &retrieval_id)
        .await
        .map_err(|e| wrap(e.into()))?;
    let expected = key.public_key_der().map_err(|e| wrap(e.into()))?;
    if keys::certificate_public_key(&leaf).as_deref() != Some(expected.as_slice()) {
        return Err(wrap(FlowError::WrongKey(key_path.clone())));
    }
    let chain = crate::vero_ca::complete_chain(&leaf);
    let cert_path = keys::write_chain(out, &chain).map_err(|e| wrap(e.into()))?;
    Ok(Issued {
        cert_path,
        key_path,
        retrieval_id,
        certificate: leaf,
    })
}
