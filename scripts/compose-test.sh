#!/usr/bin/env bash
# `make compose-test`: deploy/docker-compose.yml run for real, with rootful
# podman and podman-compose (no Docker engine runs here).
#
# Builds the image from deploy/Dockerfile (runtime stage on a debootstrapped
# bookworm, binaries from this checkout's release build: BINARIES=prebuilt),
# brings up 4 nodes on MNIST with the coordinator (semidec) and Prometheus,
# reads every node's status over gRPC from outside the containers, stops one
# node mid-run, checks that the others finish, queries Prometheus for every
# node's metrics, and brings everything down again (volumes included).
#
# Grafana's image cannot be fetched here (no registry); its provisioning is
# checked as files (scripts/check_dashboard.py), not run.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "compose-test: $*"; }

compose_cmd="$(scripts/setup-podman.sh)"
export CONTAINERS_CONF="${compose_cmd%% *}"; CONTAINERS_CONF="${CONTAINERS_CONF#CONTAINERS_CONF=}"
compose="${compose_cmd#* }"
LIBTORCH="$(scripts/setup-libtorch.sh)"; export LIBTORCH
murmur=target/release/murmur
project=murmur-test
work="$(mktemp -d)"
export MURMUR_IMAGE=murmur:compose-test
export MURMUR_PROMETHEUS_IMAGE=murmur-prometheus:bookworm
export MURMUR_RUN_CONFIG=semidec
export MURMUR_API_TOKEN_HOST_FILE="$work/api-token"
export MURMUR_DATA_DIR="${MURMUR_DATA_DIR:?set MURMUR_DATA_DIR to the folder holding mnist/}"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$MURMUR_API_TOKEN_HOST_FILE"
dc() { $compose -f deploy/docker-compose.yml -p "$project" --profile coordinator --profile monitoring "$@"; }
cleanup() {
  dc down -v -t 5 >/dev/null 2>&1 || true
  rm -rf "$work" deploy/.prebuilt
}
# On any failure, what each node counts, refused and logged (all but the
# per-round progress), before the containers go: a flake leaves its evidence.
dump() {
  say "failed: every node's status, peers and refusals, then the logs"
  dc ps || true
  for api in "${apis[@]}"; do
    "$murmur" status --json --peers "$api" 2>&1 | python3 -c 'import json,sys
t=sys.stdin.read()
try: n=json.loads(t)[0]
except Exception: print(t.strip()); sys.exit()
print({k: n.get(k) for k in ("node_index", "peer_id", "phase", "round", "live_members", "connected_peers", "refusals", "send_failures")})
for p in n.get("peers", []): print("   ", p)' || true
  done
  "$murmur" status 127.0.0.1:7079 || true
  dc logs 2>&1 | grep -v '"event":"round"' | tail -n 300 || true
}
apis=(127.0.0.1:7070 127.0.0.1:7071 127.0.0.1:7072 127.0.0.1:7073)
trap 'rc=$?; [ "$rc" = 0 ] || dump; cleanup' EXIT
cleanup_first() { dc down -v -t 5 >/dev/null 2>&1 || true; }
cleanup_first

say "image: runtime stage from this checkout's release binaries"
rm -rf deploy/.prebuilt
deploy/collect-runtime.sh deploy/.prebuilt "$murmur" target/release/murmur-coordinator
# Each build untags the last run's image and leaves its binaries' stage
# behind: about 1.1 GB a run, which filled 23 GB here. What turns dangling
# during this build is what it left, and goes; nobody else's images do.
dangling() { podman images -q --no-trunc --filter dangling=true | sort; }
dangling_before="$(dangling)"
podman build -q --format docker -f deploy/Dockerfile -t "$MURMUR_IMAGE" \
  --build-arg BINARIES=prebuilt --build-arg RUNTIME_BASE=murmur-base:bookworm . >/dev/null
left="$(comm -13 <(echo "$dangling_before") <(dangling))"
if [ -n "$left" ]; then
  # shellcheck disable=SC2086 # one id per word
  podman rmi $left >/dev/null || say "could not remove the images this build left: $left"
fi
podman image ls "$MURMUR_IMAGE" --format 'compose-test: image {{.Repository}}:{{.Tag}} is {{.Size}}'
if ! podman image exists "$MURMUR_PROMETHEUS_IMAGE"; then
  say "Prometheus image from Debian's package (once)"
  printf '%s\n' 'FROM murmur-base:bookworm' \
    'RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*' \
    'USER nobody' 'ENTRYPOINT ["/usr/bin/prometheus"]' > "$work/Containerfile.prometheus"
  podman build -q -f "$work/Containerfile.prometheus" -t "$MURMUR_PROMETHEUS_IMAGE" "$work" >/dev/null
fi

say "up: 4 nodes, the coordinator, Prometheus"
# The shipped semidec run, with rounds enough to stop a node mid-run and
# watch the others finish.
export MURMUR_CONFIG_DIR="$work/config"
mkdir -p "$MURMUR_CONFIG_DIR"
sed 's/^rounds = .*/rounds = 100/' deploy/compose/semidec.toml > "$MURMUR_CONFIG_DIR/semidec.toml"
# Grafana is named out: its image cannot be fetched here.
dc up -d node-0 node-1 node-2 node-3 coordinator prometheus >"$work/up.log" 2>&1 \
  || { cat "$work/up.log"; exit 1; }

status() { "$murmur" status --json "$@" 2>/dev/null; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(n.get('$1')) for n in d))"; }

# Podman does not enforce health conditions: poll readiness here.
deadline=$((SECONDS + 180))
until out="$(status "${apis[@]}")" && [ "$(field live_members <<<"$out")" = "4 4 4 4" ]; do
  if [ $SECONDS -ge $deadline ]; then
    say "the nodes did not all see 4 members in 180 s"; exit 1
  fi
  sleep 2
done
say "every node's status, read over gRPC from the host:"
"$murmur" status "${apis[@]}"
"$murmur" status 127.0.0.1:7079
for api in "${apis[@]}" 127.0.0.1:7079; do "$murmur" health "$api"; done

until [ "$(status 127.0.0.1:7073 | field round)" -ge 20 ] 2>/dev/null; do sleep 1; done
say "stopping node-3 at round $(status 127.0.0.1:7073 | field round)"
dc stop -t 20 node-3 >/dev/null 2>&1

for i in 0 1 2; do
  name="$(podman ps -a --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=node-$i" --format '{{.Names}}')"
  code="$(timeout 600 podman wait "$name")"
  podman cp "$name:/var/lib/murmur/summary.json" "$work/node-$i.json"
  python3 - "$work/node-$i.json" "$i" "$code" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); i = sys.argv[2]; code = int(sys.argv[3])
final = s.get("final") or {}
print(f"compose-test: node-{i} exited {code}: round {s['rounds']}, held-out accuracy "
      f"{100 * final.get('eval_accuracy', 0):.2f}%, coordinator averages {s['coordinator']['averages']}")
assert code == 0, f"node-{i} exited {code}"
assert s["rounds"] >= 100, f"node-{i} stopped at round {s['rounds']}"
assert s["coordinator"]["averages"] >= 1, s["coordinator"]
assert final.get("eval_accuracy", 0) > 0.5, final
PY
done

say "Prometheus (scraped from inside the compose network):"
python3 - <<'PY'
import json, urllib.request, urllib.parse
def q(expr):
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.load(urllib.request.urlopen(url, timeout=10))["data"]["result"]
rounds = {r["metric"]["instance"]: float(r["value"][1]) for r in q("max_over_time(murmur_round[30m])")}
for inst, r in sorted(rounds.items()):
    print(f"compose-test:   {inst} reached round {r:.0f}")
assert len(rounds) == 4, rounds
sent = q("max_over_time(murmur_bytes_sent_total[30m])")
assert len(sent) == 4 and all(float(r["value"][1]) > 0 for r in sent), sent
coord = q('max_over_time({__name__=~"murmur_coordinator_rounds_aggregated(_total)?"}[30m])')
assert coord and float(coord[0]["value"][1]) >= 1, coord
print(f"compose-test:   coordinator aggregated {float(coord[0]['value'][1]):.0f} rounds")
PY
python3 scripts/check_dashboard.py deploy/compose/grafana/dashboards/murmur.json \
  deploy/compose/grafana/provisioning/datasources/prometheus.yml http://127.0.0.1:9090
say "down"
dc down -v -t 5 >/dev/null 2>&1
say "passed in ${SECONDS} s"
