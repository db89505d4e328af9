//! Real `nats-server` processes for the NATS bridge tests, on free loopback ports, each with
//! its own JetStream store in a temporary directory: one server, with MQTT on demand, or a
//! three-node cluster. Stopped (SIGKILL) when dropped; `kill` and `restart` keep the ports
//! and the store, as an outage and recovery would.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::child::ChildGuard;
use super::pyref;

/// A free TCP port on 127.0.0.1 (the kernel's pick; closed again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `nats-server` with JetStream.
pub struct Natsd {
    child: Option<ChildGuard>,
    /// Client port.
    pub port: u16,
    /// MQTT port, if enabled.
    pub mqtt_port: Option<u16>,
    /// Cluster (route) port, if clustered.
    pub cluster_port: Option<u16>,
    dir: PathBuf,
    conf: PathBuf,
    bin: PathBuf,
}

/// How to start a server.
#[derive(Default, Clone)]
pub struct Opts {
    /// Open an MQTT listener.
    pub mqtt: bool,
    /// Join a cluster: (this node's route port, every node's route ports).
    pub cluster: Option<(u16, Vec<u16>)>,
    /// Server name (unique in a cluster).
    pub name: Option<String>,
    /// Client port (default: a free one).
    pub port: Option<u16>,
    /// The `nats-server` binary (default: [`pyref::nats_server`]).
    pub bin: Option<PathBuf>,
}

fn unique_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "usmp-natsd-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Natsd {
    /// A single server with JetStream.
    pub fn start() -> Natsd {
        Self::start_with(Opts::default())
    }

    /// A server as `opts` says; returns once it accepts clients.
    pub fn start_with(opts: Opts) -> Natsd {
        let name = opts.name.clone().unwrap_or_else(|| "n1".into());
        let dir = unique_dir(&name);
        let port = opts.port.unwrap_or_else(free_port);
        let mqtt_port = opts.mqtt.then(free_port);
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n}}\n",
            dir.join("js").display()
        );
        if let Some(m) = mqtt_port {
            conf += &format!("mqtt {{\n  listen: 127.0.0.1:{m}\n}}\n");
        }
        if let Some((own, all)) = &opts.cluster {
            let routes: Vec<String> =
                all.iter().filter(|p| *p != own).map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            conf += &format!(
                "cluster {{\n  name: usmp-test\n  listen: 127.0.0.1:{own}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
        }
        let conf_path = dir.join("nats.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut n = Natsd {
            child: None,
            port,
            mqtt_port,
            cluster_port: opts.cluster.as_ref().map(|c| c.0),
            dir,
            conf: conf_path,
            bin: opts.bin.clone().unwrap_or_else(pyref::nats_server),
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("nats.log")).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(ChildGuard(child));
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < end, "nats-server did not listen on {}: {}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    /// The server process's id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    /// Kill it (SIGKILL): an outage.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }

    /// Start it again with the same ports and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Natsd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three clustered servers with JetStream.
pub fn cluster3() -> Vec<Natsd> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    (0..3)
        .map(|i| {
            Natsd::start_with(Opts {
                cluster: Some((routes[i], routes.clone())),
                name: Some(format!("n{}", i + 1)),
                ..Opts::default()
            })
        })
        .collect()
}

/// Wait until JetStream answers on `url` (a cluster needs a meta leader first).
pub async fn wait_jetstream(url: &str) -> async_nats::Client {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = async_nats::connect(url).await {
            // The raw account-info request: async-nats's typed one does not parse 2.9's reply.
            if let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_secs(2), c.request("$JS.API.INFO", "".into())).await
            {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if v.get("error").is_none() && v.get("type").is_some() {
                    return c;
                }
            }
        }
        assert!(Instant::now() < end, "JetStream on {url} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
