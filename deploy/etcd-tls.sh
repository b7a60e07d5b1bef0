#!/bin/sh
# Certificates for TLS between trustmesh and etcd, and between etcd members: one private CA
# for etcd alone (never the trustmesh CA), a certificate per etcd member for its client and
# peer ports, and a client certificate for the trustmesh servers (CN "trustmesh": with
# `etcdctl auth enable`, etcd takes the user name from it).
#
#   deploy/etcd-tls.sh DIR MEMBER...      e.g.  deploy/etcd-tls.sh etcd-tls etcd1 etcd2 etcd3
#
# Each MEMBER is a host name (or IP address) the member is reached by; its certificate names
# it, localhost and 127.0.0.1. NAME=HOST1,HOST2,… writes one certificate NAME for several
# hosts (Kubernetes: member=etcd-0.etcd,etcd-1.etcd,etcd-2.etcd). Writes DIR/ca.pem,
# DIR/MEMBER.pem + DIR/MEMBER-key.pem and DIR/trustmesh.pem + DIR/trustmesh-key.pem (keys
# mode 0600). Keep DIR/ca-key.pem offline.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 DIR MEMBER..." >&2; exit 2; }
dir=$1; shift
mkdir -p "$dir"
umask 077
cd "$dir"
days=825

if [ ! -f ca.pem ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout ca-key.pem \
        -out ca.pem -days 3650 -subj "/CN=etcd CA for trustmesh" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

sign() {  # NAME SUBJECT EXTENSIONS
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout "$1-key.pem" \
        -out "$1.csr" -subj "/CN=$2"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.pem"
    rm -f "$1.csr" "$1.ext"
}

for member in "$@"; do
    name=${member%%=*}
    hosts=${member#*=}
    san=""
    for host in $(echo "$hosts" | tr ',' ' '); do
        case $host in
            *[!0-9.]*) san="${san}DNS:$host," ;;
            *) san="${san}IP:$host," ;;
        esac
    done
    # Members present it on the client port and, to each other, on the peer port.
    sign "$name" "$name" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=${san}DNS:localhost,IP:127.0.0.1"
done
sign trustmesh trustmesh "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
chmod 644 ./*.pem && chmod 600 ./*-key.pem
echo "wrote $(pwd): ca.pem, member and trustmesh certificates; keep ca-key.pem offline"
