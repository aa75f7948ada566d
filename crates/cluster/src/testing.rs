//! Test support shared by Ferry's test suites: a real etcd server (Debian's `etcd-server`)
//! on free loopback ports, in a temporary directory, stopped when dropped.
#![doc(hidden)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private etcd for one test.
pub struct Etcd {
    child: Child,
    pub url: String,
    dir: std::path::PathBuf,
    args: Vec<String>,
    /// With TLS: the client identity the harness itself uses.
    pub client: Option<contract::trust::TlsFiles>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// Starts etcd with TLS on its client port: a server certificate of the CA in `pki`
    /// (`ferry pki` layout; issued here as node `etcd` for 127.0.0.1), client certificates of
    /// that CA required (`--trusted-ca-file`, `--client-cert-auth`). The harness connects as
    /// `client_node`, whose certificate must exist in `pki`.
    pub fn start_tls(pki: &std::path::Path, client_node: &str) -> Etcd {
        let id = trust::Identity::node("etcd").expect("name");
        let server = trust::pki::issue(pki, &id, &["127.0.0.1".into()], 1).expect("etcd cert");
        Etcd::start_with(Some((server, trust::pki::node_files(pki, client_node))))
    }

    /// A client of this etcd (with the harness's TLS identity, if any).
    pub fn open(&self) -> crate::store::Result<Box<dyn crate::Store>> {
        match &self.client {
            Some(f) => {
                let creds = trust::tls::Credentials::load(f).map_err(crate::StoreError::Tls)?;
                crate::open_with(&self.url, Some(&creds))
            }
            None => crate::open(&self.url),
        }
    }

    fn start_with(tls: Option<(contract::trust::TlsFiles, contract::trust::TlsFiles)>) -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("ferry-etcd-{}-{}", std::process::id(), free_port()));
        let (cp, pp) = (free_port(), free_port());
        let (scheme, store) = if tls.is_some() {
            ("https", "etcds")
        } else {
            ("http", "etcd")
        };
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            dir.display().to_string(),
            "--name".into(),
            "ferry-test".into(),
            "--listen-client-urls".into(),
            format!("{scheme}://127.0.0.1:{cp}"),
            "--advertise-client-urls".into(),
            format!("{scheme}://127.0.0.1:{cp}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{pp}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{pp}"),
            "--initial-cluster".into(),
            format!("ferry-test=http://127.0.0.1:{pp}"),
        ];
        let client = tls.map(|(server, client)| {
            for (flag, path) in [
                ("--cert-file", &server.cert),
                ("--key-file", &server.key),
                ("--trusted-ca-file", &server.ca),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            args.push("--client-cert-auth".into());
            client
        });
        let child = spawn(&args);
        let e = Etcd {
            child,
            url: format!("{store}://127.0.0.1:{cp}"),
            dir,
            args,
            client,
        };
        e.wait_ready();
        e
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(s) = self.open() {
                if s.nodes().is_ok() {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "etcd did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes the server (SIGSTOP): requests hang until [`Etcd::resume`].
    pub fn pause(&self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc_kill(self.child.id() as i32, 19) };
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc_kill(self.child.id() as i32, 18) };
    }

    /// Kills the server and starts it again on the same data and ports.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.args);
        self.wait_ready();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn spawn(args: &[String]) -> Child {
    Command::new("etcd")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is missing: scripts/install-deps.sh installs it (Debian etcd-server)")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
