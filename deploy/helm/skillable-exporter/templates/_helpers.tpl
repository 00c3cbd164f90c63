{{/*
The chart's name, or nameOverride.
*/}}
{{- define "skillable-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, at most 63 characters (a DNS label). A release whose name already
contains the chart's name keeps it as it is.
*/}}
{{- define "skillable-exporter.fullname" -}}
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

{{/*
A name derived from the full name: fullname-suffix, at most 63 characters.
Call with (list $ "suffix").
*/}}
{{- define "skillable-exporter.childname" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 | lower | replace "_" "-" | replace "." "-" }}
{{- printf "%s-%s" (include "skillable-exporter.fullname" $root | trunc (int (max 1 (sub 62 (len $suffix))))) $suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skillable-exporter.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "skillable-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skillable-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skillable-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "skillable-exporter.labels" -}}
helm.sh/chart: {{ include "skillable-exporter.chart" . }}
{{ include "skillable-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: skillable-exporter
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "skillable-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "skillable-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "skillable-exporter.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* The Secret holding the API key(s). */}}
{{- define "skillable-exporter.secretName" -}}
{{- default (include "skillable-exporter.childname" (list . "api-key")) .Values.apiKey.existingSecret }}
{{- end }}

{{/* The accounts of config.accounts, or an empty list. */}}
{{- define "skillable-exporter.accounts" -}}
{{- toJson (.Values.config.accounts | default list) }}
{{- end }}

{{/* The URL path the exporter serves its metrics on (config web.telemetry_path). */}}
{{- define "skillable-exporter.telemetryPath" -}}
{{- dig "web" "telemetry_path" "/metrics" .Values.config }}
{{- end }}

{{/* Where the pieces live inside the container (as in the image and the kustomize base). */}}
{{- define "skillable-exporter.configDir" -}}/etc/skillable-exporter{{- end }}
{{- define "skillable-exporter.secretDir" -}}/etc/skillable-exporter/secret{{- end }}
{{- define "skillable-exporter.stateDir" -}}/var/lib/skillable-exporter{{- end }}

{{/* Refuse values that cannot work, with one line naming the setting. */}}
{{- define "skillable-exporter.validate" -}}
{{- if and .Values.persistence.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount > 1 needs persistence.enabled=false: replicas would share one state file (see docs/scaling.md)" }}
{{- end }}
{{- if and .Values.apiKey.existingSecret .Values.apiKey.values }}
{{- fail "set apiKey.existingSecret or apiKey.values, not both" }}
{{- end }}
{{- if and .Values.serviceMonitor.perAccount.enabled (not .Values.config.accounts) }}
{{- fail "serviceMonitor.perAccount.enabled needs config.accounts (one ServiceMonitor per account)" }}
{{- end }}
{{- $objectNames := dict }}
{{- range (include "skillable-exporter.accounts" . | fromJsonArray) }}
{{- $objectName := include "skillable-exporter.childname" (list $ (toString .name)) }}
{{- if hasKey $objectNames $objectName }}
{{- fail (printf "config.accounts: %q and %q both name the object %s" (get $objectNames $objectName) (toString .name) $objectName) }}
{{- end }}
{{- $_ := set $objectNames $objectName (toString .name) }}
{{- end }}
{{- end }}
