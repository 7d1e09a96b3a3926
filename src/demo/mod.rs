//! `vero-proxy demo`: a throwaway test PKI in a temp dir, a local stand-in upstream that requires
//! and checks the client certificate, and the real proxy in front of it. Nothing leaves the
//! machine, and the temp dir is removed on Ctrl-C.

pub mod pki;
pub mod standin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, DemoArgs};
use crate::config::Config;

/// Removes the demo's temp dir however the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_temp_dir() -> anyhow::Result<TempDir> {
    use std::os::unix::fs::DirBuilderExt;
    let mut rnd = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let path = std::env::temp_dir().join(format!(
        "vero-proxy-demo-{}",
        crate::identity::load::hex(&rnd)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&path)?;
    Ok(TempDir(path))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The wanted address if it is free, else a free port on the same IP.
fn free_or_any(wanted: &str) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = wanted
        .parse()
        .map_err(|_| anyhow::anyhow!("{wanted:?} is not IP:PORT"))?;
    if std::net::TcpListener::bind(addr).is_ok() {
        return Ok(addr);
    }
    let any = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0))?;
    Ok(any.local_addr()?)
}

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let signals = crate::app::Signals::install()?;
    let dir = make_temp_dir()?;
    let ca = pki::TestPki::new("vero-proxy demo CA")?;
    let server = ca.server(&["localhost", "127.0.0.1"])?;
    let client = ca.client("1234567-1", "Demo Payroll Oy")?;
    let (cert, key, ca_file, sw_key) = (
        dir.0.join("client.pem"),
        dir.0.join("client.key"),
        dir.0.join("ca.pem"),
        dir.0.join("software-key"),
    );
    write_private(&cert, &client.cert_pem)?;
    write_private(&key, &client.key_pem)?;
    write_private(&ca_file, &ca.ca_pem)?;
    write_private(&sw_key, "demo-software-key-not-a-real-one\n")?;

    let upstream_cfg = standin::server_config(&server, &[&ca.ca_pem], &[b"h2", b"http/1.1"])?;
    let upstream = standin::start(upstream_cfg, standin::echo()).await?;

    let listen = free_or_any(&args.listen)?;
    let admin = free_or_any(&args.admin_listen)?;
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "vero-proxy".to_string(),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--upstream".into(),
        format!("https://localhost:{}", upstream.addr.port()),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--ca-file".into(),
        ca_file.display().to_string(),
        "--add-header".into(),
        format!("Vero-SoftwareKey: @{}", sw_key.display()),
    ])?;
    let cfg = Config::from_args(&cli.run)?;
    let running = crate::app::start(cfg).await?;

    // The addresses actually bound (a port of 0 means "any free one").
    let listen = running.listen.to_string();
    let admin = running.admin;
    let base = format!("http://{listen}");
    println!(
        "\nvero-proxy demo\n\
         ===============\n\
         A throwaway CA, a client certificate (CN=1234567-1, O=Demo Payroll Oy) and its key are in\n\
         {dir}.\n\
         A LOCAL STAND-IN upstream on https://localhost:{port} plays Vero API: it is not Vero API. It\n\
         requires a client certificate from the demo CA and answers with what it received.\n\
         vero-proxy listens on {base} and forwards over mutual TLS, adding the software key header.\n\n\
         Try, in another terminal:\n\n\
         curl -s '{base}/Customer/IDs/ValidateTaxNumber/v1?taxNumber=FI12345671'\n\
         curl -s -X POST -H 'Content-Type: application/json' -d '{{\"businessId\":\"1234567-1\"}}' {base}/Customer/IDs/ValidateTaxNumber/v1\n\
         curl -s -i -H 'Origin: https://evil.example' {base}/Customer/IDs/ValidateTaxNumber/v1\n\
         curl -s http://{admin}/readyz\n\n\
         The first two show the client certificate's subject the stand-in saw and the headers it got;\n\
         the third is refused (403): a web page may not use the organisation's certificate.\n\
         Press Ctrl-C to stop; the temp dir is removed.\n",
        dir = dir.0.display(),
        port = upstream.addr.port(),
    );
    signals.wait().await;
    running.shutdown().await;
    drop(upstream);
    drop(dir);
    println!("demo stopped; temp files removed");
    Ok(())
}
