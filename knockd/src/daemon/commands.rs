//! The control requests, dispatched in one place: each command is matched
//! here once, and answered at once, or (a fleet command) by the cluster
//! task once etcd has answered, with the reply handed on.

use tokio::sync::oneshot;

use super::{Daemon, Now, RequestError, chain};
use crate::{
    cluster::Request,
    control::{Command, Response, wire::Reloaded},
};

impl Daemon {
    /// Answers a control request on `reply`.
    pub fn handle(&mut self, command: Command, reply: oneshot::Sender<Response>, now: Now) {
        self.now = now;
        let answer = match command {
            Command::Status => Response::ok(self.status()),
            Command::Grants => Response::ok(self.grant_views()),
            Command::GrantsPage { after, limit } => Response::ok(self.grant_page(after, limit)),
            Command::Metrics => Response::ok(self.metrics()),
            Command::Reload => self.reload_answer(),
            Command::Revoke { target } if self.fleet.is_some() => {
                return self.revoke_fleet(target, reply);
            }
            Command::Revoke { target } => match self.revoke(&target, u64::MAX) {
                Ok(revoked) => Response::ok(revoked),
                Err(e) => {
                    if matches!(e, RequestError::Cut { .. }) {
                        self.record_error(chain(&e));
                    }
                    Response::error(chain(&e))
                }
            },
            Command::DeviceAdd {
                id,
                groups,
                doors,
                key,
            } => return self.device_add(id, groups, doors, &key.0, reply),
            Command::DeviceRemove { id } => {
                return self.to_cluster(|reply| Request::DeviceRemove { id, reply }, reply);
            }
            Command::DeviceList => {
                return self.to_cluster(|reply| Request::DeviceList { reply }, reply);
            }
            Command::DeviceSign { id } => {
                return self.to_cluster(|reply| Request::DeviceSign { id, reply }, reply);
            }
            Command::ClusterStatus => {
                return self.to_cluster(|reply| Request::Status { reply }, reply);
            }
        };
        let _ = reply.send(answer);
    }

    /// Reloads, counting and recording the outcome; what the reload did
    /// (or why it was refused) is also kept for systemd's STATUS=.
    fn reload_answer(&mut self) -> Response {
        match self.reload() {
            Ok(reloaded) => {
                self.reloads.0 += 1;
                self.last_reload = "configuration reloaded".to_owned();
                Response::ok(Reloaded { reloaded })
            }
            Err(e) => {
                self.reloads.1 += 1;
                let e = chain(&e);
                self.record_error(format!(
                    "reload refused, the running configuration stays: {e}"
                ));
                self.last_reload = format!("reload refused: {e}");
                Response::error(e)
            }
        }
    }

    /// What the last reload did, in a few words (systemd's STATUS=).
    pub fn last_reload(&self) -> &str {
        &self.last_reload
    }
}
