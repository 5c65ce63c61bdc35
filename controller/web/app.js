// The topology page: draws the graph the controller sends over
// server-sent events, again on every change. Every name on the page comes
// from the controller's state, some from tenants: it is only ever set as
// text (textContent), never parsed as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const ROW = 28, COLUMN = 200, LEFT = 150;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const tr = el("tr");
  for (const h of head) tr.appendChild(el("th", {}, h));
  t.appendChild(tr);
  for (const r of rows) {
    const row = el("tr");
    for (const c of r) row.appendChild(el("td", {}, String(c)));
    t.appendChild(row);
  }
}

// Zones, then the VPCs whose uplink each carries (isolated VPCs under a
// node of their own), their subnets, and the subnets' ports.
function tree(t) {
  const zoneIds = new Set(t.zones.map(z => z.id));
  const node = (kind, id, label, sub, extra) => Object.assign({kind, id, label, sub, children: []}, extra || {});
  const root = node("cloud", "", "cloud", "");
  const zones = new Map();
  for (const z of t.zones) {
    const n = node("zone", z.id, z.id, z.name && z.name !== z.id ? z.name : z.prefixes.join(" "));
    zones.set(z.id, n);
    root.children.push(n);
  }
  let isolated = null;
  const vpcs = new Map();
  for (const v of t.vpcs) {
    let parent = zones.get(v.zone);
    if (!v.zone || !zoneIds.has(v.zone)) {
      if (!isolated) { isolated = node("zone", "", "no zone", "isolated VPCs"); root.children.push(isolated); }
      parent = isolated;
    }
    const n = node("vpc", v.id, v.id, "tenant " + v.tenant + " · vni " + v.vni, {quarantined: v.quarantined});
    vpcs.set(v.id, n);
    parent.children.push(n);
  }
  const subnets = new Map();
  for (const s of t.subnets) {
    const n = node("subnet", s.id, s.id, s.cidrs.join(" "));
    subnets.set(s.id, n);
    const p = vpcs.get(s.vpc);
    if (p) p.children.push(n);
  }
  for (const p of t.ports) {
    const groups = p.security_groups.length ? p.security_groups.join(",") : "no group";
    const n = node("port", p.id, p.id, p.addresses.join(" ") + " @" + p.host + " · " + groups, {quarantined: p.quarantined});
    const s = subnets.get(p.subnet);
    if (s) s.children.push(n);
  }
  return root;
}

function draw(t) {
  const g = document.getElementById("graph");
  g.replaceChildren();
  const root = d3.hierarchy(tree(t));
  d3.tree().nodeSize([ROW, COLUMN])(root);
  let minX = Infinity, maxX = -Infinity;
  root.each(n => { minX = Math.min(minX, n.x); maxX = Math.max(maxX, n.x); });
  const height = maxX - minX + 2 * ROW, width = LEFT + (root.height + 1) * COLUMN + 160;
  g.setAttribute("width", width);
  g.setAttribute("height", height);
  const top = svg("g", {transform: "translate(" + LEFT + "," + (ROW - minX) + ")"});
  g.appendChild(top);
  for (const l of root.links()) {
    const mx = (l.source.y + l.target.y) / 2;
    top.appendChild(svg("path", {class: "link",
      d: `M${l.source.y},${l.source.x}C${mx},${l.source.x} ${mx},${l.target.x} ${l.target.y},${l.target.x}`}));
  }
  const at = new Map();
  root.each(n => at.set(n.data.kind + "/" + n.data.id, n));
  // Exchange paths between zones and peerings between VPCs, as arcs to
  // the left of the tree's nodes.
  const arc = (a, b, cls, label, i) => {
    if (!a || !b) return;
    const bend = 60 + 14 * i;
    const x = Math.min(a.y, b.y) - bend;
    top.appendChild(svg("path", {class: cls, d: `M${a.y},${a.x}C${x},${a.x} ${x},${b.x} ${b.y},${b.x}`}));
    // The label where the arc bends furthest (three quarters of the way
    // to its control points).
    if (label) top.appendChild(svg("text", {class: "edge-label", x: a.y - 0.75 * bend - 4, y: (a.x + b.x) / 2 + 3,
      "text-anchor": "end"}, label));
  };
  t.exchange_paths.forEach((e, i) => arc(at.get("zone/" + e.from_zone), at.get("zone/" + e.to_zone), "path",
    e.id + ": " + e.protocol + " " + e.ports, i));
  t.peerings.forEach((p, i) => arc(at.get("vpc/" + p.vpc_a), at.get("vpc/" + p.vpc_b), "peering", p.id, i));
  root.each(n => {
    const d = n.data;
    const cls = "node " + d.kind + (d.quarantined ? " quarantined" : "");
    const ng = svg("g", {class: cls, transform: `translate(${n.y},${n.x})`, "data-kind": d.kind, "data-id": d.id});
    ng.appendChild(svg("circle", {r: 5}));
    ng.appendChild(svg("text", {x: 9, y: -1}, d.label + (d.quarantined ? " (quarantined)" : "")));
    if (d.sub) ng.appendChild(svg("text", {class: "sub", x: 9, y: 10}, d.sub));
    top.appendChild(ng);
  });
}

function show(t) {
  draw(t);
  document.getElementById("revision").textContent = t.revision;
  document.body.dataset.revision = t.revision;
  document.getElementById("counts").textContent =
    `${t.zones.length} zones · ${t.vpcs.length} VPCs · ${t.subnets.length} subnets · ${t.hosts.length} hosts · ${t.ports.length} ports`;
  table("paths", ["id", "from", "to", "proto", "ports", "source", "destination"],
    t.exchange_paths.map(e => [e.id, e.from_zone, e.to_zone, e.protocol, e.ports, e.source, e.destination]));
  table("peerings", ["id", "VPC", "VPC", "firewall"], t.peerings.map(p => [p.id, p.vpc_a, p.vpc_b, p.policy || "-"]));
  table("hosts", ["id", "underlay", "ports"], t.hosts.map(h => [h.id, h.underlay, h.ports]));
  table("groups", ["id", "name", "tenant", "rules", "ports"],
    t.security_groups.map(g => [g.id, g.name, g.tenant, g.rules, g.ports]));
  const li = el("li", {"data-revision": t.revision, "data-received-ms": Date.now()},
    "revision " + t.revision + " at " + new Date().toLocaleTimeString());
  const updates = document.getElementById("updates");
  updates.prepend(li);
  while (updates.children.length > 50) updates.lastChild.remove();
}

function connect() {
  const status = document.getElementById("status");
  const events = new EventSource("/events");
  events.addEventListener("topology", m => {
    status.textContent = "live";
    status.className = "status live";
    show(JSON.parse(m.data));
  });
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      status.textContent = "signed out: open a new link from sdnctl topology --web";
    } else {
      status.textContent = "reconnecting";
    }
    status.className = "status down";
  };
}

connect();
