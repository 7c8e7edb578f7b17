#!/usr/bin/env bash
# DEV OPTION ONLY: the job database on the head node instead of a managed PostgreSQL (production: RDS or
# Aurora, WAN_JOBS_DB_URL in the secret). Its data lives on an EBS volume of its own, created once and
# kept outside the cluster, so `ray down`, a replaced head or a new AMI leave every job in place.
#
# Once, from the operator's machine (same availability zone as the head's subnet):
#   aws ec2 create-volume --availability-zone us-east-1a --size 50 --volume-type gp3 \
#     --tag-specifications 'ResourceType=volume,Tags=[{Key=Name,Value=wan-i2v-jobs-db}]'
# After each `ray up` that made a new head, on the head's host (not in the container):
#   ssh ubuntu@$(ray get-head-ip cluster.yaml) "sudo VOLUME_ID=vol-... bash -s" < deploy/aws/head-postgres.sh
# and set, in the secret, WAN_JOBS_DB_URL=postgresql://wan:<PGPASSWORD>@<head private IP>:5432/wan.
# It attaches the volume (the operator's credentials or the head role need ec2:AttachVolume on it),
# mounts it at /var/lib/postgresql, installs PostgreSQL and lets the `wan` role in from the VPC's own
# CIDR only (read from the instance metadata, so pg_hba matches the subnets cluster.yaml names).
# The role's password is the PGPASSWORD of the secret wan-i2v/serve; it reaches psql on stdin, never on a
# command line.
set -euo pipefail
: "${VOLUME_ID:?set VOLUME_ID to the EBS volume made for the database}"
SECRET_ID=${SECRET_ID:-wan-i2v/serve}
MOUNT=/var/lib/postgresql

imds() {
  local token
  token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}
INSTANCE=$(imds instance-id)
REGION=$(imds placement/region)
MAC=$(imds mac)
VPC_CIDR=$(imds "network/interfaces/macs/$MAC/vpc-ipv4-cidr-block")

# 1. The volume, attached and mounted (formatted only when it has no file system yet).
if ! findmnt -rn "$MOUNT" >/dev/null; then
  aws ec2 attach-volume --region "$REGION" --volume-id "$VOLUME_ID" --instance-id "$INSTANCE" --device /dev/sdf >/dev/null || true
  aws ec2 wait volume-in-use --region "$REGION" --volume-ids "$VOLUME_ID"
  DEV=""
  for _ in $(seq 60); do   # Nitro instances show EBS volumes as NVMe devices named after the volume id
    DEV=$(readlink -f "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${VOLUME_ID/-/}" 2>/dev/null || true)
    [ -b "$DEV" ] && break
    sleep 2
  done
  [ -b "$DEV" ] || { echo "volume $VOLUME_ID attached but no device appeared" >&2; exit 1; }
  blkid "$DEV" >/dev/null || mkfs.ext4 -q -L wan-jobs-db "$DEV"
  mkdir -p "$MOUNT"
  grep -q "LABEL=wan-jobs-db" /etc/fstab || echo "LABEL=wan-jobs-db $MOUNT ext4 defaults,nofail 0 2" >> /etc/fstab
  mount "$MOUNT"
fi

# 2. PostgreSQL, its cluster on that volume (the package creates it there, or finds the one kept).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
PGCONF=$(ls -d /etc/postgresql/*/main | tail -1)
echo "listen_addresses = '*'" > "$PGCONF/conf.d/wan.conf"
grep -q "^host wan wan $VPC_CIDR " "$PGCONF/pg_hba.conf" \
  || echo "host wan wan $VPC_CIDR scram-sha-256" >> "$PGCONF/pg_hba.conf"
systemctl restart postgresql

# 3. The role and the database; the password from the secret into psql's stdin.
PGPASSWORD=$(aws secretsmanager get-secret-value --region "$REGION" --secret-id "$SECRET_ID" \
  --query SecretString --output text | sed -n 's/^PGPASSWORD=//p' | tail -1)
[ -n "$PGPASSWORD" ] || { echo "the secret $SECRET_ID has no PGPASSWORD line" >&2; exit 1; }
case "$PGPASSWORD" in change-me*) echo "PGPASSWORD is still the example placeholder" >&2; exit 1;; esac
sudo -u postgres psql -v ON_ERROR_STOP=1 -q <<SQL
SELECT 'CREATE ROLE wan LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'wan')\gexec
ALTER ROLE wan PASSWORD '${PGPASSWORD//\'/\'\'}';
SELECT 'CREATE DATABASE wan OWNER wan' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'wan')\gexec
SQL
echo "jobs database ready on $MOUNT; pg_hba allows $VPC_CIDR"
