//! The host's VXLAN tunnel endpoint, managed over netlink: one
//! collect-metadata device carries every VPC; the programs set and read the
//! VNI and the remote host per packet.

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

fn kind_and_collect_md(msg: &LinkMessage) -> (Option<InfoKind>, bool, Option<std::net::Ipv4Addr>) {
    let mut kind = None;
    let mut collect = false;
    let mut local = None;
    for a in &msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                match i {
                    LinkInfo::Kind(k) => kind = Some(k.clone()),
                    LinkInfo::Data(InfoData::Vxlan(v)) => {
                        collect = v.iter().any(|x| matches!(x, InfoVxlan::CollectMetadata(true)));
                        local = v.iter().find_map(|x| match x {
                            InfoVxlan::Local(a) => Some(*a),
                            _ => None,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    (kind, collect, local)
}

/// Makes sure `name` is an up collect-metadata VXLAN device on the VXLAN
/// port and returns its ifindex. With `local`, the tunnel endpoint is bound
/// to the host's underlay address, so it receives nothing sent to the
/// host's other addresses (its zone uplinks'). An existing device of that
/// name that is something else is an error, never replaced; one bound to
/// no address (made by an earlier release) is kept, with a warning, since
/// replacing it would cut the overlay.
pub async fn ensure_vxlan(name: &str, local: Option<std::net::Ipv4Addr>) -> anyhow::Result<u32> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let existing = handle.link().get().match_name(name).execute().try_next().await;
        let msg = match existing {
            Ok(Some(m)) => {
                let (kind, collect, bound) = kind_and_collect_md(&m);
                if kind != Some(InfoKind::Vxlan) || !collect {
                    anyhow::bail!(
                        "device {name} exists but is not a collect-metadata VXLAN device ({kind:?}); \
                         remove it or pass another --vxlan-device"
                    );
                }
                if let Some(want) = local {
                    match bound {
                        Some(b) if b == want => {}
                        Some(b) => anyhow::bail!(
                            "device {name} is bound to {b}, not to this host's underlay address {want}; \
                             remove it or pass the right --underlay-ip"
                        ),
                        None => tracing::warn!(
                            device = name,
                            underlay = %want,
                            "the VXLAN device is bound to no address: it also receives tunnel packets sent \
                             to the host's other addresses; recreate it (ip link del {name}) in a maintenance window"
                        ),
                    }
                }
                m
            }
            _ => {
                let mut b = LinkMessageBuilder::<LinkVxlan>::new(name);
                if let Some(a) = local {
                    b = b.local(a);
                }
                handle
                    .link()
                    .add(
                        b.collect_metadata(true)
                            .port(VXLAN_PORT)
                            .learning(false)
                            // Packets to this host's own address go through
                            // the stack too, so they carry tunnel metadata
                            // (traffic between peered VPCs on one host).
                            .localbypass(false)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .with_context(|| format!("creating VXLAN device {name}"))?;
                tracing::info!(
                    device = name,
                    port = VXLAN_PORT,
                    local = ?local,
                    "created the collect-metadata VXLAN device"
                );
                handle
                    .link()
                    .get()
                    .match_name(name)
                    .execute()
                    .try_next()
                    .await?
                    .with_context(|| format!("VXLAN device {name} vanished after creation"))?
            }
        };
        let index = msg.header.index;
        if !msg.header.flags.contains(LinkFlags::Up) {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .with_context(|| format!("setting {name} up"))?;
        }
        Ok(index)
    }
    .await;
    task.abort();
    result
}
