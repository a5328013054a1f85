//! What systemd hears from `gatehouse run` under a `Type=notify` unit
//! (`deploy/gatehouse.service`): ready once the whole group serves, stopping once it begins
//! to stop. Without systemd (`NOTIFY_SOCKET` unset) nothing is sent.

/// The group serves: the proxy, every backend and Redis answered.
pub fn ready(status: &str) {
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

fn send(states: &[sd_notify::NotifyState]) {
    // The children keep the variable: systemd accepts messages from the main process only.
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}
