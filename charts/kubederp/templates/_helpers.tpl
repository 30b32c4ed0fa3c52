{{/*
Names, labels and cross-field checks shared by every template.
*/}}

{{- define "kubederp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name when it already contains the chart name. */}}
{{- define "kubederp.fullname" -}}
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

{{- define "kubederp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubederp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubederp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubederp.labels" -}}
helm.sh/chart: {{ include "kubederp.chart" . }}
{{ include "kubederp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubederp
{{- end -}}

{{- define "kubederp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubederp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubederp.leaseName" -}}
{{- default (include "kubederp.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "kubederp.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "kubederp.relayImage" -}}
{{- if .Values.relayImage.digest -}}
{{- printf "%s@%s" .Values.relayImage.repository .Values.relayImage.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.relayImage.repository (default .Chart.AppVersion .Values.relayImage.tag) -}}
{{- end -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express clearly. */}}
{{- define "kubederp.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) -}}
{{- fail (printf "replicas=%d needs leaderElection.enabled=true: without a Lease every replica would reconcile the same regions" (int .Values.replicas)) -}}
{{- end -}}
{{- end -}}
