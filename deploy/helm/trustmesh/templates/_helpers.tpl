{{/* Names: every object is <release>-<part>, or <part> alone for a release named trustmesh. */}}
{{- define "trustmesh.fullname" -}}
{{- if eq .Release.Name .Chart.Name -}}
{{- .Chart.Name -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trustmesh.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one part: call with (list $ "server"). */}}
{{- define "trustmesh.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "trustmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "trustmesh.etcdName" -}}
{{- printf "%s-etcd" (include "trustmesh.fullname" .) -}}
{{- end -}}

{{/* The store URL: the deployed members by their stable names, or the external endpoints. */}}
{{- define "trustmesh.store" -}}
{{- $endpoints := list -}}
{{- if .Values.etcd.deploy -}}
{{- $name := include "trustmesh.etcdName" . -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s-%d.%s:2379" $name $i $name) -}}
{{- end -}}
{{- else -}}
{{- if not .Values.etcd.endpoints -}}
{{- fail "etcd.endpoints: list the external etcd members (host:port), or set etcd.deploy=true" -}}
{{- end -}}
{{- $endpoints = .Values.etcd.endpoints -}}
{{- end -}}
{{- printf "etcd+https://%s%s" (join "," $endpoints) .Values.etcd.prefix -}}
{{- end -}}

{{/* The container securityContext every trustmesh container starts from. */}}
{{- define "trustmesh.restrictedContainer" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
