{{/* Names and labels. */}}
{{- define "partita.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "partita.labels" -}}
app.kubernetes.io/name: partita
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "partita.scorerSelector" -}}
app.kubernetes.io/name: partita
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: scorer
{{- end -}}

{{- define "partita.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* A zone name as a DNS label part. */}}
{{- define "partita.zoneSuffix" -}}
{{- . | lower | replace "_" "-" | replace "." "-" | trunc 20 | trimSuffix "-" -}}
{{- end -}}

{{/* Port of a "host:port" listen address. */}}
{{- define "partita.port" -}}
{{- last (splitList ":" .) -}}
{{- end -}}

{{/* Bootstrap address of a Kafka tier: (dict "tier" .Values.kafka.ingestion "ns" .Release.Namespace). */}}
{{- define "partita.bootstrap" -}}
{{- if .tier.create -}}
{{ .tier.name }}-kafka-bootstrap.{{ .ns }}.svc:9093
{{- else -}}
{{ required "kafka.<tier>.bootstrap is required when create is false" .tier.bootstrap }}
{{- end -}}
{{- end -}}

{{/* librdkafka properties of a tier (the password comes from the environment). */}}
{{- define "partita.kafkaProperties" -}}
{{- if .tier.create -}}
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = {{ printf "%s-partita" .tier.name | toJson }}
"ssl.ca.location" = {{ printf "/etc/partita/kafka-%s/ca.crt" .name | toJson }}
{{- else -}}
{{- range $k, $v := .tier.properties }}
{{ $k | toJson }} = {{ $v | toString | toJson }}
{{- end }}
{{- if .tier.caSecret.name }}
"ssl.ca.location" = {{ printf "/etc/partita/kafka-%s/%s" .name .tier.caSecret.key | toJson }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The CQL contact points. */}}
{{- define "partita.cqlUri" -}}
{{- if .Values.scylla.create -}}
{{ .Values.scylla.name }}-client.{{ .Release.Namespace }}.svc:9042
{{- else -}}
{{ required "scylla.uri is required when scylla.create is false and the backend is cql" .Values.scylla.uri }}
{{- end -}}
{{- end -}}

{{/* partita.toml of a role: `config` with the addresses the chart knows.
     (dict "root" $ "role" "scorer" | "worker"); scorers are role both without workers. */}}
{{- define "partita.toml" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $full := include "partita.fullname" $root -}}
{{- $cfg := deepCopy $v.config -}}
{{- $_ := set $cfg.node "grace" (printf "%ds" (int $v.scorer.graceSeconds)) -}}
{{- if eq $cfg.state.backend "cql" -}}
{{- $_ := set $cfg.state "cql_uri" (include "partita.cqlUri" $root) -}}
{{- $_ := set $cfg.state "cql_datacenter" $v.scylla.datacenter -}}
{{- end -}}
{{- if eq $cfg.state.backend "rocksdb" -}}
{{- $_ := set $cfg.state "dir" "/var/lib/partita/state" -}}
{{- end -}}
{{- if not $cfg.traces.otlp_endpoint -}}
{{- $_ := unset $cfg.traces "otlp_endpoint" -}}
{{- end -}}
{{- $tls := and $v.workers.enabled $v.grpcTls.enabled -}}
{{- if and $v.workers.enabled (not $v.grpcTls.enabled) (not $v.grpcTls.allowPlaintext) -}}
{{- fail "workers.enabled: scorers and workers talk over the network; set grpcTls (mutual TLS) or, on a network you trust, grpcTls.allowPlaintext: true" -}}
{{- end -}}
{{- if and $v.workers.enabled (eq .role "scorer") -}}
{{- $_ := set $cfg.node "role" "scorer" -}}
{{- $grpc := include "partita.port" $cfg.node.grpc_listen -}}
{{- $endpoints := list -}}
{{- range $v.zones -}}
{{- $endpoints = append $endpoints (printf "%s=%s-worker-%s.%s.svc:%s" .name $full (include "partita.zoneSuffix" .name) $root.Release.Namespace $grpc) -}}
{{- end -}}
{{- $_ := set $cfg.inference "worker_endpoints" (join "," $endpoints) -}}
{{- $_ := set $cfg.inference "worker_security" "plaintext" -}}
{{- if $tls -}}
{{- $_ := set $cfg.inference "worker_security" "mtls" -}}
{{- $_ := set $cfg.inference "worker_tls_ca" "/etc/partita/tls/ca.crt" -}}
{{- $_ := set $cfg.inference "worker_tls_cert" "/etc/partita/tls/tls.crt" -}}
{{- $_ := set $cfg.inference "worker_tls_key" "/etc/partita/tls/tls.key" -}}
{{- $_ := set $cfg.inference "worker_tls_domain" (include "partita.grpcServerName" $root) -}}
{{- end -}}
{{- end -}}
{{- if eq .role "worker" -}}
{{- $_ := set $cfg.node "role" "worker" -}}
{{- $_ := set $cfg.node "grace" (printf "%ds" (int $v.workers.graceSeconds)) -}}
{{- $_ := set $cfg.inference "device" $v.workers.device -}}
{{- $_ := set $cfg.node "grpc_security" "plaintext" -}}
{{- if $tls -}}
{{- $_ := set $cfg.node "grpc_security" "mtls" -}}
{{- $_ := set $cfg.node "grpc_tls_cert" "/etc/partita/tls/tls.crt" -}}
{{- $_ := set $cfg.node "grpc_tls_key" "/etc/partita/tls/tls.key" -}}
{{- $_ := set $cfg.node "grpc_tls_client_ca" "/etc/partita/tls/ca.crt" -}}
{{- end -}}
{{- end -}}
# Rendered by the partita Helm chart from its values (keys: config/partita.toml).
[ingestion]
bootstrap = {{ include "partita.bootstrap" (dict "tier" $v.kafka.ingestion "ns" $root.Release.Namespace) | toJson }}

[ingestion.properties]
{{ include "partita.kafkaProperties" (dict "tier" $v.kafka.ingestion "name" "ingestion") }}

[processing]
bootstrap = {{ include "partita.bootstrap" (dict "tier" $v.kafka.processing "ns" $root.Release.Namespace) | toJson }}

[processing.properties]
{{ include "partita.kafkaProperties" (dict "tier" $v.kafka.processing "name" "processing") }}
{{- range $section, $keys := $cfg }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{ $key }} = {{ $value | toJson }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The name the workers' certificate holds (the scorers check it). */}}
{{- define "partita.grpcServerName" -}}
{{- .Values.grpcTls.serverName | default (printf "%s-worker" (include "partita.fullname" .)) -}}
{{- end -}}

{{/* The gRPC TLS Secret as a volume and its mount (workers and scorers, with grpcTls). */}}
{{- define "partita.grpcTlsVolume" -}}
{{- if and .Values.workers.enabled .Values.grpcTls.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ required "grpcTls.secretName is required with grpcTls.enabled" .Values.grpcTls.secretName }}
    items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}, {key: ca.crt, path: ca.crt}]
{{- end }}
{{- end -}}

{{- define "partita.grpcTlsMount" -}}
{{- if and .Values.workers.enabled .Values.grpcTls.enabled }}
- {name: grpc-tls, mountPath: /etc/partita/tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "partita.workerSelector" -}}
app.kubernetes.io/name: partita
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{/* Kafka password and CA volumes of a tier: (dict "tier" ... "name" "ingestion"). */}}
{{- define "partita.kafkaPasswordEnv" -}}
{{- $secret := "" -}}{{- $key := "password" -}}
{{- if .tier.create -}}
{{- $secret = printf "%s-partita" .tier.name -}}
{{- else if .tier.passwordSecret.name -}}
{{- $secret = .tier.passwordSecret.name -}}{{- $key = .tier.passwordSecret.key -}}
{{- end -}}
{{- if $secret }}
- name: {{ printf "KAFKA_%s_PASSWORD" (upper .name) }}
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ $key }}}
- name: {{ printf "PARTITA_%s__PROPERTIES" (upper .name) }}
  value: {{ printf "sasl.password=$(KAFKA_%s_PASSWORD)" (upper .name) | quote }}
{{- end }}
{{- end -}}

{{- define "partita.kafkaCaVolume" -}}
{{- $secret := "" -}}{{- $key := "ca.crt" -}}
{{- if .tier.create -}}
{{- $secret = printf "%s-cluster-ca-cert" .tier.name -}}
{{- else if .tier.caSecret.name -}}
{{- $secret = .tier.caSecret.name -}}{{- $key = .tier.caSecret.key -}}
{{- end -}}
{{- if $secret }}
- name: kafka-{{ .name }}-ca
  secret:
    secretName: {{ $secret }}
    items: [{key: {{ $key }}, path: {{ $key }}}]
{{- end }}
{{- end -}}

{{- define "partita.kafkaCaMount" -}}
{{- if or .tier.create .tier.caSecret.name }}
- name: kafka-{{ .name }}-ca
  mountPath: /etc/partita/kafka-{{ .name }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* CQL credentials from a Secret. */}}
{{- define "partita.cqlCredentialsEnv" -}}
{{- with .Values.scylla.credentialsSecret }}{{ if .name }}
- name: PARTITA_STATE__CQL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ .name }}, key: {{ .usernameKey }}}
- name: PARTITA_STATE__CQL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .name }}, key: {{ .passwordKey }}}
{{- end }}{{ end }}
{{- end -}}

{{- define "partita.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "partita.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
{{- end -}}
