//! The host's VXLAN tunnel endpoint, managed over netlink: one
//! collect-metadata device carries every VPC; the programs set and read the
//! VNI and the remote host per packet.

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

fn kind_and_collect_md(msg: &LinkMessage) -> (Option<InfoKind>, bool) {
    let mut kind = None;
    let mut collect = false;
    for a in &msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                match i {
                    LinkInfo::Kind(k) => kind = Some(k.clone()),
                    LinkInfo::Data(InfoData::Vxlan(v)) => {
                        collect = v.iter().any(|x| matches!(x, InfoVxlan::CollectMetadata(true)));
                    }
                    _ => {}
                }
            }
        }
    }
    (kind, collect)
}

/// Makes sure `name` is an up collect-metadata VXLAN device on the VXLAN
/// port and returns its ifindex. An existing device of that name that is
/// something else is an error, never replaced.
pub async fn ensure_vxlan(name: &str) -> anyhow::Result<u32> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let result = async {
        let existing = handle.link().get().match_name(name).execute().try_next().await;
        let msg = match existing {
            Ok(Some(m)) => {
                let (kind, collect) = kind_and_collect_md(&m);
                if kind != Some(InfoKind::Vxlan) || !collect {
                    anyhow::bail!(
                        "device {name} exists but is not a collect-metadata VXLAN device ({kind:?}); \
                         remove it or pass another --vxlan-device"
                    );
                }
                m
            }
            _ => {
                handle
                    .link()
                    .add(
                        LinkMessageBuilder::<LinkVxlan>::new(name)
                            .collect_metadata(true)
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
