// peer_gate in AssemblyScript, on the @gcoredev/proxy-wasm-sdk-as SDK (Proxy-Wasm ABI 0.2.1).
//
// Requests whose path starts with `protectedPrefix` are refused with 403 unless the
// peer's SPIFFE ID (property connection.uri_san_peer_certificate) is listed in
// `allowedPeers`. Every response gets the header `header: value`. Same configuration
// as the C example:
//   {"protectedPrefix": "/admin", "allowedPeers": ["spiffe://..."],
//    "header": "x-weft-plugin", "value": "as-peer-gate"}
// plus, optionally, "bodySuffix": text appended to every response body (the SDK's
// body callback: it asks for the whole body, then changes it). Without it the
// plugin leaves bodies alone, and they stream past it.
export * from "@gcoredev/proxy-wasm-sdk-as/assembly/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  stream_context,
  get_property,
  send_local_response,
  GrpcStatusValues,
  log,
  LogLevelValues,
  FilterDataStatusValues,
  BufferTypeValues,
  set_buffer_bytes,
} from "@gcoredev/proxy-wasm-sdk-as/assembly";

// The value after `"key":` in a flat JSON object: a string, or "" if absent.
function afterKey(json: string, key: string): i32 {
  const k = json.indexOf('"' + key + '"');
  if (k < 0) return -1;
  const colon = json.indexOf(":", k + key.length + 2);
  return colon < 0 ? -1 : colon + 1;
}

function readString(json: string, from: i32): string {
  const s = json.indexOf('"', from);
  if (s < 0) return "";
  const e = json.indexOf('"', s + 1);
  return e < 0 ? "" : json.substring(s + 1, e);
}

function readStrings(json: string, from: i32): Array<string> {
  const out = new Array<string>();
  const end = json.indexOf("]", from);
  let p = from;
  while (end > 0) {
    const s = json.indexOf('"', p);
    if (s < 0 || s > end) break;
    const e = json.indexOf('"', s + 1);
    if (e < 0) break;
    out.push(json.substring(s + 1, e));
    p = e + 1;
  }
  return out;
}

class PeerGateRoot extends RootContext {
  protectedPrefix: string = "/admin";
  allowedPeers: Array<string> = new Array<string>();
  header: string = "x-weft-plugin";
  value: string = "as-peer-gate";
  bodySuffix: string = "";

  onConfigure(size: u32): bool {
    if (!super.onConfigure(size)) return false;
    const json = this.getConfiguration();
    let at = afterKey(json, "protectedPrefix");
    if (at >= 0) this.protectedPrefix = readString(json, at);
    at = afterKey(json, "header");
    if (at >= 0) this.header = readString(json, at);
    at = afterKey(json, "value");
    if (at >= 0) this.value = readString(json, at);
    at = afterKey(json, "allowedPeers");
    if (at >= 0) this.allowedPeers = readStrings(json, at);
    at = afterKey(json, "bodySuffix");
    if (at >= 0) this.bodySuffix = readString(json, at);
    return true;
  }

  createContext(context_id: u32): Context {
    return new PeerGate(context_id, this);
  }
}

class PeerGate extends Context {
  gate: PeerGateRoot;
  constructor(context_id: u32, root: PeerGateRoot) {
    super(context_id, root);
    this.gate = root;
  }

  onRequestHeaders(_n: u32, _eos: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.startsWith(this.gate.protectedPrefix)) {
      const raw = get_property("connection\0uri_san_peer_certificate");
      const peer = raw.byteLength > 0 ? String.UTF8.decode(raw) : "";
      if (!this.gate.allowedPeers.includes(peer)) {
        log(LogLevelValues.info, "peer_gate: denied " + path + " for " + peer);
        send_local_response(403, "peer_gate", String.UTF8.encode("denied by the peer_gate plugin\n"), [], GrpcStatusValues.Unknown);
        return FilterHeadersStatusValues.StopIteration;
      }
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(_n: u32, _eos: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add(this.gate.header, this.gate.value);
    return FilterHeadersStatusValues.Continue;
  }

  onResponseBody(size: usize, eos: bool): FilterDataStatusValues {
    if (this.gate.bodySuffix.length == 0) return FilterDataStatusValues.Continue;
    // The whole body, please: the suffix goes after its end.
    if (!eos) return FilterDataStatusValues.StopIterationAndBuffer;
    set_buffer_bytes(BufferTypeValues.HttpResponseBody, <u32>size, 0, String.UTF8.encode(this.gate.bodySuffix));
    return FilterDataStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new PeerGateRoot(context_id);
}, "peer_gate");
