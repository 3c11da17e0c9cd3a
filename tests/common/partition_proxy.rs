//! A TCP proxy that can cut the network silently: while cut it forwards nothing, reads
//! nothing and resets nothing, as on a path whose packets are dropped. Connections made
//! meanwhile wait, unforwarded, until the cut ends. It can also be pointed at another
//! server, as a DNS name or a service is moved to a promoted standby.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct PartitionProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    upstream: Arc<AtomicU16>,
}

impl PartitionProxy {
    /// Forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> PartitionProxy {
        Self::serve(TcpListener::bind("127.0.0.1:0").unwrap(), upstream)
    }

    /// Like [`PartitionProxy::start`], with the smallest receive buffers the kernel allows on
    /// the client side: during a cut the client's unacknowledged data meets a zero window
    /// after a few hundred bytes, as it would meet silence on a dead path.
    pub fn start_with_small_buffers(upstream: u16) -> PartitionProxy {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(1).unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(16).unwrap();
        Self::serve(socket.into(), upstream)
    }

    fn serve(listener: TcpListener, upstream: u16) -> PartitionProxy {
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let upstream = Arc::new(AtomicU16::new(upstream));
        let (flag, target) = (cut.clone(), upstream.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (flag, target) = (flag.clone(), target.clone());
                std::thread::spawn(move || {
                    while flag.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let upstream = target.load(Ordering::SeqCst);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    let pipes = [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ];
                    for (mut from, mut to) in pipes {
                        let flag = flag.clone();
                        std::thread::spawn(move || forward(&mut from, &mut to, &flag));
                    }
                });
            }
        });
        PartitionProxy {
            port,
            cut,
            upstream,
        }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    /// Forwards new connections to 127.0.0.1:`upstream`; open ones stay where they are.
    pub fn set_upstream(&self, upstream: u16) {
        self.upstream.store(upstream, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` except while `cut`: nothing read after the cut began is written
/// before it ends. Ends (closing both) when either side closes.
fn forward(from: &mut TcpStream, to: &mut TcpStream, cut: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A read that was waiting when the cut began returns what came after it:
                // held until the cut ends, like everything else sent during it.
                while cut.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
