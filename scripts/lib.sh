# shellcheck shell=bash
# Helpers shared by the scripts in scripts/ and .ci/run. Source it; don't run it.
# Every function is idempotent: calling it when the thing is already there is cheap.

# The repo root is this file's parent's parent, so the scripts work from any cwd and
# without git (a tarball or a copied tree behaves the same).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export REPO_ROOT
VENV="$REPO_ROOT/.venv"
LOCAL_DIR="$REPO_ROOT/.local"

# Where the native (non-Docker) servers listen; the CQRS_* defaults below use the same.
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
RABBIT_HOST=127.0.0.1
RABBIT_PORT=5672

log() { printf '%s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}
heading() { printf '\n==> %s\n' "$*" >&2; }

# wait_until SECONDS CMD [ARGS...]: run CMD every half second until it succeeds;
# fails once SECONDS have passed.
wait_until() {
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

# tcp_open HOST PORT: true if something accepts a TCP connection (bash's /dev/tcp,
# bounded by timeout so a black-holed address can't hang us).
tcp_open() {
	# shellcheck disable=SC2016 # $1 and $2 belong to the inner shell
	timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# http_ok URL: true if URL answers 2xx within 2 s.
http_ok() {
	if command -v curl >/dev/null; then
		curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
	else
		python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
			"$1" 2>/dev/null
	fi
}

# wait_http URL SECONDS
wait_http() {
	wait_until "$2" http_ok "$1"
}

# pid_alive PIDFILE [PATTERN]: true if the pid in PIDFILE runs and, when PATTERN is
# given, its command line contains PATTERN (guards against a recycled pid).
pid_alive() {
	local pid
	[[ -s $1 ]] || return 1
	pid="$(<"$1")"
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	[[ -z ${2:-} ]] && return 0
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# start_background PIDFILE LOGFILE CMD [ARGS...]: start CMD detached (own session, so a
# Ctrl-C in the terminal or the caller's exit doesn't take it down), output appended to
# LOGFILE. The child writes its own pid, which stays right even if setsid had to fork.
start_background() {
	local pidfile=$1 logfile=$2
	shift 2
	rm -f "$pidfile"
	# shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
	setsid bash -c 'echo "$$" >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
	wait_until 10 test -s "$pidfile" || die "could not start $1 (see $logfile)"
}

pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# stop_pid PIDFILE NAME [PATTERN]: TERM, then INT, then KILL, each with a timeout.
# Only touches the pid recorded in PIDFILE (and only if it still is PATTERN).
stop_pid() {
	local pidfile=$1 name=$2 pattern=${3:-} pid sig wait_s
	if ! pid_alive "$pidfile" "$pattern"; then
		rm -f "$pidfile"
		log "$name: not running"
		return 0
	fi
	pid="$(<"$pidfile")"
	for step in TERM:20 INT:10 KILL:5; do
		sig=${step%%:*} wait_s=${step##*:}
		[[ $sig == TERM ]] || log "$name (pid $pid) still running; sending SIG$sig"
		kill -s "$sig" "$pid" 2>/dev/null || true
		if wait_until "$wait_s" pid_gone "$pid"; then
			rm -f "$pidfile"
			log "$name: stopped (pid $pid)"
			return 0
		fi
	done
	die "$name (pid $pid) did not stop even after SIGKILL"
}

# python_311: print a python >= 3.11 interpreter, preferring python3.11. Each candidate
# is run, because a pyenv shim can exist for a version that isn't installed.
python_311() {
	local candidate
	for candidate in python3.11 python3; do
		if command -v "$candidate" >/dev/null &&
			"$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
			command -v "$candidate"
			return 0
		fi
	done
	return 1
}

# pip_install PYTHON ARGS...: quiet pip install. Drops pip's "Location 'file:///...' is
# ignored" warnings, one per package, which a pip config naming absent local index folders
# causes on some machines and which would bury real errors.
pip_install() {
	local python=$1 status=0
	shift
	"$python" -m pip install -q --disable-pip-version-check "$@" 2>&1 |
		{ grep -v "^WARNING: Location 'file://.*' is ignored" || true; } >&2 || status=$?
	return "$status"
}

VENV_STAMP="$VENV/.cqrs-pyproject.sha256"
pyproject_sha() { sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1; }
venv_current() {
	[[ -x $VENV/bin/python && -f $VENV_STAMP && "$(<"$VENV_STAMP")" == "$(pyproject_sha)" ]]
}

# ensure_venv: .venv with the project installed editable plus its dev tools. The install
# is skipped when the stamp records the current pyproject.toml's sha256, so a second run
# costs nothing; a changed pyproject.toml reinstalls. A lock keeps two scripts from
# installing into the same venv at once.
ensure_venv() {
	local python lock_fd
	venv_current && return 0
	mkdir -p "$LOCAL_DIR"
	exec {lock_fd}>"$LOCAL_DIR/venv.lock"
	flock "$lock_fd"
	# Checked again under the lock: another script may have just installed it.
	if ! venv_current; then
		if ! "$VENV/bin/python" -c '' 2>/dev/null; then
			python="$(python_311)" || die "need Python >= 3.11 (python3.11 or python3) on PATH"
			log "creating $VENV with $python"
			"$python" -m venv --clear "$VENV"
		fi
		log "installing the project and its dev tools into .venv (pyproject.toml changed or new venv)"
		pip_install "$VENV/bin/python" -e "${REPO_ROOT}[dev]"
		pyproject_sha >"$VENV_STAMP"
	fi
	flock -u "$lock_fd"
	exec {lock_fd}>&-
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

# ensure_postgres: the local cluster answers on $PG_HOST:$PG_PORT, started if it doesn't.
ensure_postgres() {
	local version
	command -v pg_isready >/dev/null || die "pg_isready not found: install PostgreSQL's client tools"
	pg_ready && return 0
	log "PostgreSQL is not answering on $PG_HOST:$PG_PORT; starting it"
	command -v pg_ctlcluster >/dev/null || die "pg_ctlcluster not found: start PostgreSQL yourself"
	# The newest installed major version, e.g. /etc/postgresql/15.
	version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
	[[ -n $version ]] || die "no cluster under /etc/postgresql"
	pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
		log "pg_ctlcluster failed; waiting in case the cluster is starting anyway"
	wait_until 60 pg_ready || die "PostgreSQL did not answer on $PG_HOST:$PG_PORT within 60 s"
}

# ensure_database NAME: create the database if it is missing.
ensure_database() {
	local name=$1 exists
	[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || die "unexpected database name: $name"
	exists="$(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAq \
		-c "SELECT 1 FROM pg_database WHERE datname = '$name'")"
	[[ $exists == 1 ]] && return 0
	log "creating database $name"
	psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -q -v ON_ERROR_STOP=1 \
		-c "CREATE DATABASE \"$name\""
}

rabbit_ready() { tcp_open "$RABBIT_HOST" "$RABBIT_PORT"; }

# ensure_rabbitmq: the local broker accepts AMQP connections, started if it doesn't.
# The TCP check is used first because rabbitmqctl takes a second or two to boot Erlang.
ensure_rabbitmq() {
	rabbit_ready && return 0
	log "RabbitMQ is not answering on $RABBIT_HOST:$RABBIT_PORT; starting it"
	command -v rabbitmq-server >/dev/null || die "rabbitmq-server not found: start RabbitMQ yourself"
	rabbitmq-server -detached || log "rabbitmq-server -detached failed; waiting in case it runs"
	timeout 120 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
	wait_until 60 rabbit_ready || die "RabbitMQ did not answer on $RABBIT_HOST:$RABBIT_PORT"
}

# ensure_rabbit_plugin [PLUGIN]: the consistent-hash exchange partitions commands and
# events by aggregate id; it ships with RabbitMQ but is off by default.
ensure_rabbit_plugin() {
	local plugin=${1:-rabbitmq_consistent_hash_exchange} out
	command -v rabbitmq-plugins >/dev/null || die "rabbitmq-plugins not found: enable $plugin yourself"
	out="$(rabbitmq-plugins -q enable "$plugin" 2>&1)" || {
		log "$out"
		die "could not enable the RabbitMQ plugin $plugin"
	}
}

# ensure_vhost NAME: a vhost where guest may do everything (tests get their own, so
# they can't disturb a system running on "/").
ensure_vhost() {
	local vhost=$1
	if ! rabbitmqctl -q list_vhosts name 2>/dev/null | grep -qxF -- "$vhost"; then
		log "creating RabbitMQ vhost $vhost"
		# A concurrent creator makes add_vhost fail; the permission step still decides.
		rabbitmqctl -q add_vhost "$vhost" >/dev/null || true
	fi
	rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null ||
		die "could not grant guest access to vhost $vhost"
}

# mongo_local ARGS...: scripts/mongo-local, through bash so a lost executable bit can't
# break the callers.
mongo_local() { bash "$REPO_ROOT/scripts/mongo-local" "$@"; }

# docker_answers: a Docker engine (not just the client) responds.
docker_answers() {
	command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1
}
