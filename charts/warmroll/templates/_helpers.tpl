{{/* Name of the chart, overridable. */}}
{{- define "warmroll.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified release name: the prefix of every object. */}}
{{- define "warmroll.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "warmroll.agent.fullname" -}}
{{- printf "%s-agent" (include "warmroll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "warmroll.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "warmroll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The reader: a ServiceAccount and ClusterRole that may GET the HTTP port's inventory. */}}
{{- define "warmroll.reader.fullname" -}}
{{- printf "%s-reader" (include "warmroll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Secret holding the agent channel's TLS certificate, key and CA. */}}
{{- define "warmroll.tls.secretName" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- required "tls.secretName is required when tls.mode is secret" .Values.tls.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "warmroll.coordinator.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "warmroll.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "warmroll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "warmroll.agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warmroll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "warmroll.coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warmroll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: coordinator
{{- end -}}

{{- define "warmroll.agent.image" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) -}}
{{- end -}}

{{- define "warmroll.coordinator.image" -}}
{{- printf "%s:%s" .Values.coordinator.image.repository (default .Chart.AppVersion .Values.coordinator.image.tag) -}}
{{- end -}}

{{/* The agent ServiceAccount as the coordinator checks it: namespace:name. */}}
{{- define "warmroll.agent.serviceAccount" -}}
{{- printf "%s:%s" .Release.Namespace (include "warmroll.agent.fullname" .) -}}
{{- end -}}

{{/* Container security settings shared by both programs. */}}
{{- define "warmroll.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
