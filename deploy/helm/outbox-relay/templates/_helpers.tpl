{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name, with the chart's name unless it already holds it. */}}
{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the config's ConfigMap is mounted (a directory: updates reach the pod). */}}
{{- define "outbox-relay.configDir" -}}/etc/outbox-relay/config{{- end }}

{{/* volumeMounts shared by the relay and the init Job (no subPath anywhere). */}}
{{- define "outbox-relay.volumeMounts" -}}
- name: config
  mountPath: {{ include "outbox-relay.configDir" . }}
  readOnly: true
{{- range .Values.secretMounts }}
- name: secret-{{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- range .Values.configMapMounts }}
- name: configmap-{{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* volumes shared by the relay and the init Job; $configMap names the config's ConfigMap. */}}
{{- define "outbox-relay.volumes" -}}
{{- $root := index . 0 }}
{{- $configMap := index . 1 -}}
- name: config
  configMap:
    name: {{ $configMap }}
{{- range $root.Values.secretMounts }}
- name: secret-{{ .name }}
  secret:
    secretName: {{ .secretName }}
    defaultMode: {{ default 288 .defaultMode }}
{{- end }}
{{- range $root.Values.configMapMounts }}
- name: configmap-{{ .name }}
  configMap:
    name: {{ .configMapName }}
{{- end }}
# The root filesystem is read-only; a small scratch directory for libraries that want one.
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with $root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
