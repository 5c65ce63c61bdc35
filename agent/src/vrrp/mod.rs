//! VRRP version 3 (RFC 9568): the hosts that hold a virtual IP elect its
//! owner on their shared link, as keepalived does and with keepalived.
//! `packet` writes and reads the advertisements, `machine` is the state
//! machine of one virtual router.

pub mod machine;
pub mod packet;
pub mod speaker;
