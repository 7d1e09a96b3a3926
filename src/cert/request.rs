//! `vero-proxy cert request`: the first certificate, with the one-time transfer ID and password
//! the organisation's technical contact received.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use zeroize::Zeroizing;

use crate::certsvc::dsig::SignerTrust;
use crate::certsvc::{self, Customer, Issued, PollSchedule, Service};
use crate::vero_ca::Environment;

/// Flags every `cert` command that talks to the certificate service shares.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Which Tax Administration environment: test or production.
    #[arg(long, value_enum)]
    pub environment: Environment,

    /// The organisation's business ID (Y-tunnus), e.g. 1234567-1. For `renew`, by default the
    /// one in the current certificate's CN (or --organisation).
    #[arg(long)]
    pub customer_id: Option<String>,

    /// The organisation's name (optional; goes into the request and the CSR's O).
    #[arg(long)]
    pub customer_name: Option<String>,

    /// Directory for the new cert.pem and key.pem (created with mode 0700 if missing). For
    /// `renew --identities-dir DIR --organisation ID`, by default DIR/ID/next.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// Replace cert.pem and key.pem already in --out. Without it the command refuses: such a
    /// key may belong to a retrieval still to be finished with --retrieval-id.
    #[arg(long)]
    pub force: bool,

    /// Finish a retrieval the service already accepted (its RetrievalId), with the key kept in
    /// --out/key.pem from that attempt; sends no new request.
    #[arg(long)]
    pub retrieval_id: Option<String>,

    /// Certificate service URL [default: the --environment's service]; for a stand-in or relay.
    #[arg(long)]
    pub service_url: Option<String>,

    /// PEM file of CAs to trust for the service's TLS certificate, besides the system store.
    #[arg(long)]
    pub service_ca_file: Option<PathBuf>,

    /// PEM file of roots to check the service's response signatures with, instead of the
    /// embedded Tax Administration chains. For tests with a stand-in only.
    #[arg(long)]
    pub service_signer_ca: Option<PathBuf>,

    /// How long to keep asking for the certificate after the service accepted the request.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub retrieval_timeout: Duration,

    /// Reach the service through this HTTP proxy with CONNECT (http://HOST:PORT); else
    /// HTTPS_PROXY / NO_PROXY when set, as `run` does for the upstream.
    #[arg(long, env = "VERO_PROXY_EGRESS_PROXY")]
    pub egress_proxy: Option<String>,

    /// File holding `user:password` for the egress proxy (basic authentication).
    #[arg(long, env = "VERO_PROXY_EGRESS_PROXY_CREDENTIALS_FILE")]
    pub egress_proxy_credentials_file: Option<PathBuf>,
}

impl ServiceArgs {
    /// The service client these flags describe.
    pub fn service(&self) -> anyhow::Result<Service> {
        let extra = match &self.service_ca_file {
            Some(p) => crate::upstream::tls::read_pem_certs(p, "--service-ca-file")?,
            None => Vec::new(),
        };
        let signers = match &self.service_signer_ca {
            Some(p) => SignerTrust::roots(crate::upstream::tls::read_pem_certs(
                p,
                "--service-signer-ca",
            )?),
            None => SignerTrust::embedded(self.environment),
        };
        let poll = PollSchedule {
            deadline: self.retrieval_timeout,
            ..PollSchedule::default()
        };
        let flags = crate::upstream::EgressFlags {
            proxy: self.egress_proxy.as_deref(),
            credentials_file: self.egress_proxy_credentials_file.as_deref(),
        };
        let env = crate::upstream::egress::ProxyEnv::from_process();
        Ok(Service::new(
            self.environment,
            self.service_url.as_deref(),
            &extra,
            signers,
            poll,
        )?
        .route_by(&flags, &env)?)
    }

    /// The customer fields of every request.
    pub fn customer(&self) -> anyhow::Result<Customer> {
        let id = self.customer_id.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "--customer-id is required: the organisation's business ID, such as 1234567-1"
            )
        })?;
        let id: crate::business_id::BusinessId = id
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("--customer-id: {e}"))?;
        Ok(Customer {
            environment: self.environment,
            customer_id: id.to_string(),
            customer_name: self.customer_name.clone(),
        })
    }

    /// The output directory.
    pub fn out(&self) -> anyhow::Result<&Path> {
        self.out.as_deref().ok_or_else(|| {
            anyhow::anyhow!("--out DIR is required: where the new cert.pem and key.pem go")
        })
    }

    /// Before finishing a retrieval into --out: its cert.pem is not overwritten without --force.
    pub fn check_resume(&self) -> anyhow::Result<()> {
        let cert = self.out()?.join(certsvc::keys::CERT_FILE);
        if cert.exists() && !self.force {
            anyhow::bail!(
                "{} already exists: refusing to overwrite it; choose another --out (with the key \
                 of the retrieval copied into it) or pass --force",
                cert.display()
            );
        }
        Ok(())
    }

    /// The command line that finishes a retrieval, `{retrieval_id}` left to fill in.
    pub fn resume_hint(&self, command: &str) -> String {
        let mut s = format!(
            "vero-proxy cert {command} --environment {} --customer-id {} --out {} --retrieval-id {{retrieval_id}}",
            self.environment,
            self.customer_id.as_deref().unwrap_or("ID"),
            self.out.as_deref().map(|o| o.display().to_string()).unwrap_or_else(|| "DIR".into())
        );
        if let Some(u) = &self.service_url {
            s.push_str(&format!(" --service-url {u}"));
        }
        s
    }
}

/// Flags of `vero-proxy cert request`.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// The service, the customer and the output directory.
    #[command(flatten)]
    pub service: ServiceArgs,

    /// The one-time transfer ID from the Tax Administration's email.
    #[arg(
        long,
        required_unless_present = "retrieval_id",
        conflicts_with = "retrieval_id"
    )]
    pub transfer_id: Option<String>,

    /// File whose first line is the one-time transfer password. Without it the password comes
    /// from VERO_PROXY_TRANSFER_PASSWORD, or a prompt on a terminal; never from a flag.
    #[arg(long)]
    pub transfer_password_file: Option<PathBuf>,
}

/// The transfer password: the file's first line, the environment variable, or a prompt.
fn transfer_password(args: &RequestArgs) -> anyhow::Result<Zeroizing<String>> {
    if let Some(p) = &args.transfer_password_file {
        return crate::identity::source::read_password_file(p).map_err(|e| {
            anyhow::anyhow!("cannot read --transfer-password-file {}: {e}", p.display())
        });
    }
    if let Ok(v) = std::env::var("VERO_PROXY_TRANSFER_PASSWORD") {
        return Ok(Zeroizing::new(v));
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let pw = rpassword::prompt_password("Transfer password: ")?;
        return Ok(Zeroizing::new(
            pw.trim_end_matches(['\r', '\n']).to_string(),
        ));
    }
    anyhow::bail!(
        "the transfer password is needed: --transfer-password-file PATH, the \
         VERO_PROXY_TRANSFER_PASSWORD environment variable, or run on a terminal to be asked"
    )
}

/// Runs `cert request`.
pub async fn run(args: RequestArgs) -> anyhow::Result<()> {
    let s = &args.service;
    let customer = s.customer()?;
    let out = s.out()?;
    let svc = s.service()?;
    let hint = s.resume_hint("request");
    let issued = if let Some(rid) = &s.retrieval_id {
        s.check_resume()?;
        eprintln!("Asking the certificate service for RetrievalId {rid} ...");
        certsvc::resume(&svc, &customer, rid, out, &hint).await?
    } else {
        let transfer = certsvc::Transfer {
            id: args.transfer_id.clone().unwrap_or_default(),
            password: transfer_password(&args)?,
        };
        certsvc::flow::prepare_out(out, s.force)?;
        eprintln!(
            "Generating an RSA 2048 key and sending the request to {} ...",
            svc.url
        );
        certsvc::request(&svc, &customer, &transfer, out, &hint).await?
    };
    print_done(&issued, s.environment, "request");
    Ok(())
}

/// Tells where the files are and what to do next.
pub fn print_done(issued: &Issued, env: Environment, what: &str) {
    let dir = issued
        .cert_path
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    println!("Certificate: {}", issued.cert_path.display());
    println!(
        "Key:         {} (mode 0600; keep it on this machine)",
        issued.key_path.display()
    );
    println!(
        "Subject:     {}",
        certsvc::dsig::subject_of(&issued.certificate)
    );
    if what == "request" {
        println!("Next: vero-proxy run --identity-dir {dir} --upstream {env}");
    }
}
